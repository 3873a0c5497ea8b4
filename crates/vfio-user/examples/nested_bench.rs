//! Print the nested-IOMMU benchmark:
//! `cargo run --release -p nestio-vfio-user --example nested_bench [iterations]`.

fn main() {
    let n = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(20_000);
    match nestio_vfio_user::bench::nested_dma(n) {
        Ok(r) => println!("{r}"),
        Err(e) => {
            eprintln!("benchmark failed: {e}");
            std::process::exit(1);
        }
    }
}
