//! The bench's embedded broker in a child process of its own. librdkafka's mock broker keeps
//! about 5 MB of log per partition (180 MB for the default workload's topics), memory no
//! deployment of the service holds, so the bench measures the service's peak RSS without it
//! and reports the broker's apart.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};

use crate::config::Config;
use crate::embedded_broker::EmbeddedBroker;
use crate::thread_cpu;

/// What the child prints before the broker's address, on a line of its own.
const ADDRESS_LINE: &str = "bootstrap.servers ";

/// Why the broker's process could not be started or run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BrokerProcessError {
    /// The executable could not be started.
    #[error("starting the embedded broker's process {exe}: {source}")]
    Spawn {
        /// The executable.
        exe: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The child ended, or printed something else, before its address.
    #[error("the embedded broker's process {exe} gave no address; it said {said:?}")]
    NoAddress {
        /// The executable.
        exe: PathBuf,
        /// What it printed instead.
        said: String,
    },
    /// The broker itself would not start, in the child.
    #[error(transparent)]
    Broker(#[from] crate::embedded_broker::BrokerError),
    /// The child could not print its address or read its parent's end.
    #[error("the embedded broker's process: {0}")]
    Io(#[from] std::io::Error),
}

/// A running embedded broker in a child process; it is stopped when dropped.
pub struct BrokerProcess {
    child: Child,
    /// Closed on drop: the child ends when its parent's end of the pipe does, even a parent
    /// that was killed.
    stdin: Option<ChildStdin>,
    bootstrap: String,
}

impl BrokerProcess {
    /// Starts `exe embedded-broker` with `config`'s topics of `partitions` partitions each, and
    /// waits for its address.
    pub fn spawn(exe: &Path, config: &Config, partitions: i32) -> Result<Self, BrokerProcessError> {
        let mut command = Command::new(exe);
        command
            .arg("embedded-broker")
            .arg("--partitions")
            .arg(partitions.to_string());
        for topic in EmbeddedBroker::topics(config) {
            command.arg("--topic").arg(topic);
        }
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|source| BrokerProcessError::Spawn {
                exe: exe.to_path_buf(),
                source,
            })?;
        let stdout = child.stdout.take();
        // Owned before its address is read, so that a failed read stops the child too.
        let mut process = BrokerProcess {
            stdin: child.stdin.take(),
            child,
            bootstrap: String::new(),
        };
        let mut line = String::new();
        if let Some(stdout) = stdout {
            BufReader::new(stdout).read_line(&mut line)?;
        }
        match line.trim_end().strip_prefix(ADDRESS_LINE) {
            Some(address) if !address.is_empty() => {
                process.bootstrap = address.to_string();
                Ok(process)
            }
            _ => Err(BrokerProcessError::NoAddress {
                exe: exe.to_path_buf(),
                said: line,
            }),
        }
    }

    /// The broker's `bootstrap.servers`.
    pub fn bootstrap_servers(&self) -> &str {
        &self.bootstrap
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// CPU seconds the child has used so far, if `/proc` tells.
    pub fn cpu_seconds(&self) -> Option<f64> {
        thread_cpu::process_cpu_seconds_of(self.pid())
    }

    /// The child's peak resident set so far, in KiB (0 where `/proc` does not tell).
    pub fn peak_rss_kib(&self) -> u64 {
        crate::bench::peak_rss_kib_of(&format!("/proc/{}/status", self.pid()))
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        drop(self.stdin.take());
        // It ends on its own once its stdin closes; killed as well, in case it hangs.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The child's side (`aggregator embedded-broker`): starts the broker with `topics`, prints its
/// address on stdout, and serves until stdin closes.
pub fn serve(topics: &[String], partitions: i32) -> Result<(), BrokerProcessError> {
    let broker = EmbeddedBroker::start_with_topics(topics, partitions)?;
    let mut stdout = std::io::stdout();
    writeln!(stdout, "{ADDRESS_LINE}{}", broker.bootstrap_servers())?;
    stdout.flush()?;
    // Reads until the parent closes its end or dies; what it writes is ignored.
    std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink())?;
    drop(broker);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config::from_toml(include_str!("../config.toml")).expect("the shipped configuration")
    }

    #[test]
    fn an_executable_that_cannot_start_is_named() {
        let Err(e) = BrokerProcess::spawn(Path::new("/nonexistent/aggregator"), &config(), 1)
        else {
            panic!("started a process that does not exist");
        };
        let text = e.to_string();
        assert!(text.contains("/nonexistent/aggregator"), "{text}");
    }

    #[test]
    fn a_child_that_prints_no_address_is_refused_with_what_it_said() {
        // `echo` prints its arguments: the subcommand and the topics, not an address.
        let Err(e) = BrokerProcess::spawn(Path::new("/bin/echo"), &config(), 3) else {
            panic!("took echo's output for an address");
        };
        let text = e.to_string();
        assert!(
            text.contains("gave no address") && text.contains("embedded-broker --partitions 3"),
            "{text}"
        );
    }
}
