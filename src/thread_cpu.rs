//! CPU time and wake-ups of this process's threads, grouped by what they work for, from `/proc`
//! (Linux): the bench runs the service beside its own broker and producer, and this tells their
//! shares apart.

use std::collections::HashMap;
use std::path::Path;

use serde::Serialize;

/// Clock ticks per second of `/proc`'s CPU times (`USER_HZ`, fixed at 100 in Linux's ABI).
const USER_HZ: f64 = 100.0;

/// What a thread of the bench's process works for, by its name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ThreadGroup {
    /// The service's own threads: the actors, the consumer's poll loop, the store's and the
    /// view loader's.
    Service,
    /// librdkafka's threads and the producers' pollers, the service's clients and the bench
    /// producer's alike (their names do not say which).
    KafkaClients,
    /// The embedded broker: its thread where it runs in this process, every thread of its own
    /// process where the bench runs it apart ([`Snapshot::with_broker`]).
    EmbeddedBroker,
    /// The bench's producer thread, which generates the events and hands them to its client.
    BenchProducer,
}

/// The group of a thread named `name` (as `/proc` shows it: at most 15 bytes).
pub fn group_of(name: &str) -> ThreadGroup {
    match name {
        "rdk:mock" => ThreadGroup::EmbeddedBroker,
        "bench-producer" => ThreadGroup::BenchProducer,
        // rdkafka's `ThreadedProducer` names its thread "producer polling thread".
        n if n.starts_with("rdk:") || n.starts_with("producer pollin") => ThreadGroup::KafkaClients,
        _ => ThreadGroup::Service,
    }
}

/// Which part of the service a thread of [`ThreadGroup::Service`] works for, by its name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ServicePart {
    /// The thread that runs the actor system (the partition supervisors, the entity actors and
    /// the offset committer): the one the snapshots are taken on.
    Actors,
    /// The arbiters' threads: the dedup actor's own.
    Dedup,
    /// The blocking pool: encoding writes, the store stages and their flushes.
    BlockingPool,
    /// sled's I/O threads: writing its log, and freeing old node copies.
    SledIo,
    /// The consumer's poll loop, which also parses.
    Consumer,
    /// The view loader.
    ViewLoader,
    /// Any other thread of the service (HTTP, offset commits).
    Other,
}

/// The part of the service a thread named `name` works for, other than the actors' thread,
/// which is told by its id.
pub fn service_part_of(name: &str) -> ServicePart {
    match name {
        "kafka-consumer" => ServicePart::Consumer,
        "view-loader" => ServicePart::ViewLoader,
        // tokio's default name for a runtime's threads; the service's runtimes are
        // single-threaded, so only their blocking pools carry it.
        "tokio-rt-worker" => ServicePart::BlockingPool,
        n if n.starts_with("sled-io") => ServicePart::SledIo,
        n if n.starts_with("actix-rt|") => ServicePart::Dedup,
        _ => ServicePart::Other,
    }
}

/// A figure of the service's threads by part: CPU seconds or wake-ups, per event once divided.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct ServiceParts {
    /// The actors' thread.
    pub actors: f64,
    /// The dedup actor's thread.
    pub dedup: f64,
    /// The blocking pool (encoding, store stages, flushes).
    pub blocking_pool: f64,
    /// sled's I/O threads.
    pub sled_io: f64,
    /// The consumer's poll loop.
    pub consumer: f64,
    /// The view loader.
    pub view_loader: f64,
    /// The rest.
    pub other: f64,
}

impl ServiceParts {
    fn add(&mut self, part: ServicePart, amount: f64) {
        *match part {
            ServicePart::Actors => &mut self.actors,
            ServicePart::Dedup => &mut self.dedup,
            ServicePart::BlockingPool => &mut self.blocking_pool,
            ServicePart::SledIo => &mut self.sled_io,
            ServicePart::Consumer => &mut self.consumer,
            ServicePart::ViewLoader => &mut self.view_loader,
            ServicePart::Other => &mut self.other,
        } += amount;
    }

    fn scaled(&self, by: impl Fn(f64) -> f64) -> ServiceParts {
        ServiceParts {
            actors: by(self.actors),
            dedup: by(self.dedup),
            blocking_pool: by(self.blocking_pool),
            sled_io: by(self.sled_io),
            consumer: by(self.consumer),
            view_loader: by(self.view_loader),
            other: by(self.other),
        }
    }
}

/// A figure per thread group: CPU seconds ([`Snapshot::since`]) or wake-ups
/// ([`Snapshot::wakeups_since`]), per event once divided.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct ByGroup {
    /// The service's own threads.
    pub service: f64,
    /// librdkafka's threads and the producers' pollers.
    pub kafka_clients: f64,
    /// The embedded broker.
    pub embedded_broker: f64,
    /// The bench producer.
    pub bench_producer: f64,
    /// The service's share, by part.
    pub service_parts: ServiceParts,
}

impl ByGroup {
    fn add(&mut self, group: ThreadGroup, part: ServicePart, amount: f64) {
        if group == ThreadGroup::Service {
            self.service_parts.add(part, amount);
        }
        *match group {
            ThreadGroup::Service => &mut self.service,
            ThreadGroup::KafkaClients => &mut self.kafka_clients,
            ThreadGroup::EmbeddedBroker => &mut self.embedded_broker,
            ThreadGroup::BenchProducer => &mut self.bench_producer,
        } += amount;
    }

    /// CPU seconds as microseconds per event over `events`.
    pub fn us_per_event(&self, events: u64) -> ByGroup {
        self.scaled(|seconds| seconds * 1e6 / events.max(1) as f64)
    }

    /// Wake-ups per event over `events`.
    pub fn per_event(&self, events: u64) -> ByGroup {
        self.scaled(|count| count / events.max(1) as f64)
    }

    fn scaled(&self, by: impl Fn(f64) -> f64) -> ByGroup {
        ByGroup {
            service: by(self.service),
            kafka_clients: by(self.kafka_clients),
            embedded_broker: by(self.embedded_broker),
            bench_producer: by(self.bench_producer),
            service_parts: self.service_parts.scaled(by),
        }
    }
}

/// What a thread (or threads, summed) had used at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Figures {
    /// CPU seconds used so far (user and system).
    pub cpu_seconds: f64,
    /// Times woken after waiting so far (`voluntary_ctxt_switches`): on a shared machine each
    /// costs a switch, and a thread woken for nothing still takes a core from another.
    pub wakeups: f64,
}

impl Figures {
    /// The calling thread's figures so far (zero where `/proc` does not tell).
    pub fn own() -> Self {
        Figures {
            cpu_seconds: own_cpu_seconds().unwrap_or(0.0),
            wakeups: status_wakeups(Path::new("/proc/thread-self/status")),
        }
    }
}

/// What a snapshot read of one thread.
#[derive(Clone, Copy, Debug)]
struct ThreadSample {
    group: ThreadGroup,
    part: ServicePart,
    figures: Figures,
}

/// The CPU seconds and wake-ups each live thread had at one moment, by thread id, with its
/// group.
#[derive(Clone, Debug, Default)]
pub struct Snapshot(HashMap<u32, ThreadSample>);

impl Snapshot {
    /// Every live thread's group, CPU time and wake-ups now (empty where `/proc` is
    /// unreadable); the calling thread counts as the actors' (the bench takes its snapshots on
    /// the thread that runs the actor system).
    pub fn now() -> Self {
        let mut threads = HashMap::new();
        read_tasks("/proc/self/task", group_of, &mut threads);
        if let Some(own) = own_tid().and_then(|tid| threads.get_mut(&tid)) {
            own.part = ServicePart::Actors;
        }
        Snapshot(threads)
    }

    /// The same, and every thread of process `broker` counted as the embedded broker's: the
    /// bench runs its broker in a process of its own, whose threads are all the broker's.
    pub fn with_broker(broker: u32) -> Self {
        let mut snapshot = Snapshot::now();
        let task = format!("/proc/{broker}/task");
        read_tasks(&task, |_| ThreadGroup::EmbeddedBroker, &mut snapshot.0);
        snapshot
    }

    /// What the live threads of `group` had used, summed, if any thread of it was alive.
    pub fn figures_of(&self, group: ThreadGroup) -> Option<Figures> {
        self.0
            .values()
            .filter(|thread| thread.group == group)
            .map(|thread| thread.figures)
            .reduce(|a, b| Figures {
                cpu_seconds: a.cpu_seconds + b.cpu_seconds,
                wakeups: a.wakeups + b.wakeups,
            })
    }

    /// CPU time per group used since `earlier` by the threads alive now (a thread that ended
    /// meanwhile is not counted; one started meanwhile counts from its start).
    pub fn since(&self, earlier: &Snapshot) -> ByGroup {
        self.grown_since(earlier, |figures| figures.cpu_seconds)
    }

    /// Wake-ups per group since `earlier`, counted as [`Snapshot::since`] counts CPU time.
    pub fn wakeups_since(&self, earlier: &Snapshot) -> ByGroup {
        self.grown_since(earlier, |figures| figures.wakeups)
    }

    fn grown_since(&self, earlier: &Snapshot, figure: impl Fn(&Figures) -> f64) -> ByGroup {
        let mut by_group = ByGroup::default();
        for (tid, thread) in &self.0 {
            let before = earlier.0.get(tid).map_or(0.0, |t| figure(&t.figures));
            let grown = (figure(&thread.figures) - before).max(0.0);
            by_group.add(thread.group, thread.part, grown);
        }
        by_group
    }
}

/// Adds each thread under the task directory `dir` (`/proc/<pid>/task`) to `into`, in the group
/// `group` gives its name.
fn read_tasks(
    dir: &str,
    group: impl Fn(&str) -> ThreadGroup,
    into: &mut HashMap<u32, ThreadSample>,
) {
    let Ok(tasks) = std::fs::read_dir(dir) else {
        return;
    };
    for task in tasks.flatten() {
        let Some(tid) = task.file_name().to_str().and_then(|t| t.parse().ok()) else {
            continue;
        };
        let Some(stat) = std::fs::read_to_string(task.path().join("stat")).ok() else {
            continue;
        };
        let Some((name, cpu_seconds)) = parse_stat(&stat) else {
            continue;
        };
        let wakeups = status_wakeups(&task.path().join("status"));
        into.insert(
            tid,
            ThreadSample {
                group: group(name),
                part: service_part_of(name),
                figures: Figures {
                    cpu_seconds,
                    wakeups,
                },
            },
        );
    }
}

/// The calling thread's id, if `/proc` tells.
fn own_tid() -> Option<u32> {
    let link = std::fs::read_link("/proc/thread-self").ok()?;
    link.file_name()?.to_str()?.parse().ok()
}

/// CPU seconds the calling thread has used so far (user and system), if `/proc` tells.
pub fn own_cpu_seconds() -> Option<f64> {
    stat_seconds("/proc/thread-self/stat")
}

/// CPU seconds every thread of this process has used so far (user and system), if `/proc` tells.
pub fn process_cpu_seconds() -> Option<f64> {
    stat_seconds("/proc/self/stat")
}

/// CPU seconds every thread of process `pid` has used so far, if `/proc` tells.
pub fn process_cpu_seconds_of(pid: u32) -> Option<f64> {
    stat_seconds(&format!("/proc/{pid}/stat"))
}

/// The CPU seconds in the `/proc` stat file at `path`.
fn stat_seconds(path: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(path).ok()?;
    parse_stat(&stat).map(|(_, seconds)| seconds)
}

/// The name and the CPU seconds (user and system) in a `/proc/.../stat` line.
fn parse_stat(stat: &str) -> Option<(&str, f64)> {
    // The name is in parentheses and may hold spaces and parentheses itself; the fields after
    // it start with the state, field 3, and utime and stime are fields 14 and 15.
    let (head, rest) = stat.rsplit_once(')')?;
    let name = head.split_once('(')?.1;
    let mut fields = rest.split_whitespace().skip(11);
    let utime: f64 = fields.next()?.parse().ok()?;
    let stime: f64 = fields.next()?.parse().ok()?;
    Some((name, (utime + stime) / USER_HZ))
}

/// The times the thread whose `/proc/.../status` is at `path` has been woken after waiting
/// (zero where it cannot be read).
fn status_wakeups(path: &Path) -> f64 {
    std::fs::read_to_string(path)
        .ok()
        .as_deref()
        .and_then(parse_wakeups)
        .unwrap_or(0) as f64
}

/// The times a thread has been woken after waiting, from its `/proc/.../status` text.
fn parse_wakeups(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("voluntary_ctxt_switches:"))?
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn threads_are_grouped_by_name() {
        for (name, group) in [
            ("rdk:mock", ThreadGroup::EmbeddedBroker),
            ("bench-producer", ThreadGroup::BenchProducer),
            ("rdk:broker1", ThreadGroup::KafkaClients),
            ("rdk:main", ThreadGroup::KafkaClients),
            ("producer pollin", ThreadGroup::KafkaClients),
            ("kafka-consumer", ThreadGroup::Service),
            ("tokio-rt-worker", ThreadGroup::Service),
            ("aggregator", ThreadGroup::Service),
        ] {
            assert_eq!(group_of(name), group, "{name}");
        }
    }

    #[test]
    fn service_threads_are_split_by_part_and_the_parts_make_up_the_service() {
        for (name, part) in [
            ("actix-rt|system", ServicePart::Dedup),
            ("tokio-rt-worker", ServicePart::BlockingPool),
            ("sled-io-3", ServicePart::SledIo),
            ("kafka-consumer", ServicePart::Consumer),
            ("view-loader", ServicePart::ViewLoader),
            ("offset-commit", ServicePart::Other),
            ("aggregator", ServicePart::Other),
        ] {
            assert_eq!(service_part_of(name), part, "{name}");
        }
        // The thread a snapshot is taken on is the actors', whatever its name.
        let snapshot = Snapshot::now();
        let own = own_tid().expect("Linux tells a thread its id");
        assert!(matches!(
            snapshot.0.get(&own),
            Some(ThreadSample {
                part: ServicePart::Actors,
                ..
            })
        ));
        let mut cpu = ByGroup::default();
        cpu.add(ThreadGroup::Service, ServicePart::Actors, 2.0);
        cpu.add(ThreadGroup::Service, ServicePart::SledIo, 0.5);
        // A Kafka client's thread counts for no part of the service, whatever its name says.
        cpu.add(ThreadGroup::KafkaClients, ServicePart::Other, 1.0);
        let per_event = cpu.us_per_event(1_000_000);
        assert_eq!(per_event.service, 2.5);
        assert_eq!(per_event.service_parts.actors, 2.0);
        assert_eq!(per_event.service_parts.sled_io, 0.5);
        assert_eq!(per_event.service_parts.other, 0.0);
        assert_eq!(per_event.kafka_clients, 1.0);
    }

    #[test]
    fn every_thread_of_the_broker_process_counts_as_the_broker() {
        // A child that spins, named like none of this process's groups.
        let mut child = std::process::Command::new("sh")
            .args(["-c", "while :; do :; done"])
            .spawn()
            .expect("sh starts");
        let pid = child.id();
        let before = Snapshot::with_broker(pid);
        let start = process_cpu_seconds_of(pid).unwrap_or(0.0);
        // Busy for at least 60 ms of its own CPU time, read from /proc as the snapshot reads it.
        let deadline = Instant::now() + Duration::from_secs(10);
        let used = loop {
            let used = process_cpu_seconds_of(pid).unwrap_or(0.0) - start;
            if used >= 0.06 || Instant::now() > deadline {
                break used;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let after = Snapshot::with_broker(pid);
        let _ = child.kill();
        let _ = child.wait();
        assert!(used >= 0.06, "the child spun for {used} s");
        let by_group = after.since(&before);
        assert!(
            by_group.embedded_broker >= used,
            "{by_group:?} against {used} s used"
        );
        assert!(before.figures_of(ThreadGroup::EmbeddedBroker).is_some());
    }

    #[test]
    fn a_stat_line_gives_its_name_and_cpu_seconds() {
        let stat = "4242 (odd (name) x) S 1 2 3 4 5 6 7 8 9 10 250 75 0 0 20 0 1 0";
        assert_eq!(parse_stat(stat), Some(("odd (name) x", 3.25)));
        assert_eq!(parse_stat("4242 (cut) S 1 2"), None);
    }

    /// Snapshots taken before and after a thread named `name` did `work`, the thread alive at
    /// both, with what `work` returned.
    fn around_thread<T: Send + 'static>(
        name: &str,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> (Snapshot, Snapshot, T) {
        let before = Snapshot::now();
        let (done, wait) = std::sync::mpsc::channel::<()>();
        let (finished, work_ended) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                finished.send(work()).expect("the test waits");
                wait.recv().ok();
            })
            .expect("thread");
        let returned = work_ended.recv().expect("the thread reports");
        let after = Snapshot::now();
        done.send(()).expect("the thread waits");
        thread.join().expect("joined");
        (before, after, returned)
    }

    #[test]
    fn a_busy_thread_counts_for_its_group_from_the_earlier_snapshot_on() {
        let (before, after, used) = around_thread("bench-producer", || {
            // Busy for at least 60 ms of its own CPU time, read from /proc as the snapshot
            // reads it.
            let deadline = Instant::now() + Duration::from_secs(10);
            let own = || own_cpu_seconds().unwrap_or(0.0);
            while own() < 0.06 && Instant::now() < deadline {
                std::hint::black_box((0..10_000u64).sum::<u64>());
            }
            own()
        });
        let by_group = after.since(&before);
        assert!(used >= 0.06, "the thread spun for {used} s");
        assert!(
            by_group.bench_producer >= used,
            "{by_group:?} against {used} s used"
        );
        assert_eq!(before.figures_of(ThreadGroup::BenchProducer), None);
        let producer = after.figures_of(ThreadGroup::BenchProducer);
        assert!(
            producer.is_some_and(|f| f.cpu_seconds >= used),
            "{producer:?}"
        );
        let per_event = by_group.us_per_event(1000);
        assert!((per_event.bench_producer - by_group.bench_producer * 1e3).abs() < 1e-6);
    }

    #[test]
    fn a_status_text_gives_the_times_its_thread_was_woken() {
        let status = "Name:\tsled-io-3\nState:\tS (sleeping)\n\
                      voluntary_ctxt_switches:\t2621\nnonvoluntary_ctxt_switches:\t206\n";
        assert_eq!(parse_wakeups(status), Some(2621));
        assert_eq!(parse_wakeups("Name:\tx\n"), None);
    }

    #[test]
    fn a_thread_that_waits_and_is_woken_counts_its_wakeups_for_its_group_and_part() {
        const WAITS: usize = 40;
        let (before, after, own) = around_thread("sled-io-9", || {
            // Each sleep blocks the thread and the timer wakes it: one wake-up each.
            for _ in 0..WAITS {
                std::thread::sleep(Duration::from_millis(1));
            }
            Figures::own()
        });
        let wakeups = after.wakeups_since(&before);
        assert!(
            own.wakeups >= WAITS as f64,
            "the thread read {own:?} itself"
        );
        assert!(
            wakeups.service_parts.sled_io >= WAITS as f64,
            "{wakeups:?} against {WAITS} sleeps"
        );
        assert!(wakeups.service >= wakeups.service_parts.sled_io);
        let per_event = wakeups.per_event(WAITS as u64);
        assert!(per_event.service_parts.sled_io >= 1.0, "{per_event:?}");
    }
}
