//! `cargo run --release -p nestio-dma --features harness --example copy_bench [ROUNDS]`:
//! the copy benchmark of `nestio bench --only dma` without building the whole binary.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let rounds = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(5);
    println!("{}", nestio_dma::bench::copy(rounds)?);
    Ok(())
}
