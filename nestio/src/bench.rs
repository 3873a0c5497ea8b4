//! `nestio bench`: protocol costs as ratios to floors measured in the same run.

use clap::Args;

use crate::CmdResult;

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Round trips per measurement.
    #[arg(long, default_value_t = 20000)]
    iterations: u64,
}

pub fn run(args: BenchArgs) -> CmdResult {
    let r = nestio_vfio_user::bench::run(args.iterations)?;
    println!("{r}");
    Ok(0)
}
