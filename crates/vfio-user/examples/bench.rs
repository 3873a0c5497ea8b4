//! Print the vfio-user benchmark: `cargo run --release -p nestio-vfio-user --example bench [iterations]`.

fn main() {
    let n = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(20_000);
    match nestio_vfio_user::bench::run(n) {
        Ok(r) => println!("{r}"),
        Err(e) => {
            eprintln!("benchmark failed: {e}");
            std::process::exit(1);
        }
    }
}
