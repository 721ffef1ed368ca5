//! `hcp`: the Hybrid Compute Platform's one binary. Reads files, parses arguments, wires the pure
//! crates together and prints results. All decisions happen in the pure crates.

mod backtest_cmd;
mod bench;
mod bench_gateway;
mod bench_plane;
mod chart;
mod cli;
mod loadtest;
mod report;
mod serve;

fn main() -> std::process::ExitCode {
    cli::main()
}
