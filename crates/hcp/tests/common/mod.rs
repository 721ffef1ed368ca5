//! Helpers shared by the test binaries of `hcp` (each uses some of them).
#![allow(dead_code)]

use std::process::Command;

/// A running `hcp up` (or `hcp serve`) child and the address it listens on.
pub struct Up {
    pub child: std::process::Child,
    pub base: String,
    pub lines: std::sync::mpsc::Receiver<String>,
}

impl Up {
    pub fn start(args: &[&str], envs: &[(&str, &str)]) -> Up {
        use std::io::BufRead;
        // Each platform's simulated backend on a port of its own.
        let mut args = args.to_vec();
        if matches!(args.first(), Some(&"up") | Some(&"serve")) {
            args.extend(["--sim-backend-listen", "127.0.0.1:0"]);
        }
        let mut child = Command::new(env!("CARGO_BIN_EXE_hcp"))
            .args(&args)
            .envs(envs.iter().copied())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("run hcp");
        let out = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        let first = lines.recv_timeout(std::time::Duration::from_secs(60)).expect("hcp printed its address");
        let base = first.strip_prefix("hcp: listening on ").expect("first line names the address").to_string();
        Up { child, base, lines }
    }

    pub fn line_with(&self, needle: &str) -> String {
        loop {
            let l = self.lines.recv_timeout(std::time::Duration::from_secs(30)).expect("hcp printed it");
            if l.contains(needle) {
                return l;
            }
        }
    }

    pub fn signal(&mut self, sig: &str) -> std::process::ExitStatus {
        Command::new("kill").args([sig, &self.child.id().to_string()]).status().unwrap();
        self.child.wait().unwrap()
    }
}

impl Drop for Up {
    /// A test that fails midway leaves no platform running.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
