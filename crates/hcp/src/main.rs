//! `hcp`: the Hybrid Compute Platform's one binary. Reads files, parses arguments, wires the pure
//! crates together and prints results. All decisions happen in the pure crates.

mod backtest_cmd;
mod bench;
mod bench_auth;
mod bench_e2e;
mod bench_gateway;
mod bench_plane;
mod chart;
mod cli;
mod loadtest;
mod measure;
mod report;
mod serve;

/// mimalloc instead of the C library's allocator: under the gateway's load (a thousand streams,
/// each event allocating a little on two threads) glibc's malloc and free took 18 % of the
/// platform's CPU (perf); see docs/benchmarks.md.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    cli::main()
}
