//! sled's own memory and write rate for a store shaped like the service's: views under random
//! entity keys, written in one atomic batch per flush and flushed, with the service's allocator.
//! It measures the floor the store sets under the service's peak RSS, whatever the service does.
//!
//! `cargo run --release --example sled_footprint -- --keys 1000000 --writes 2000000 --value-bytes 400 --cache-mib 256`

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Parser;

#[global_allocator]
static GLOBAL: aggregator::allocator::Allocator = aggregator::allocator::Allocator;

/// Writes views of one size under random keys in batches, then prints peak RSS and writes/s.
#[derive(Parser)]
struct Options {
    /// Distinct keys (entities).
    #[arg(long, default_value_t = 1_000_000)]
    keys: u64,
    /// Views written in all (each to a key drawn uniformly).
    #[arg(long, default_value_t = 2_000_000)]
    writes: u64,
    /// Bytes per view.
    #[arg(long, default_value_t = 400)]
    value_bytes: usize,
    /// sled's `cache_capacity`, in MiB (the service's `store.cache_mib`).
    #[arg(long, default_value_t = 256)]
    cache_mib: u64,
    /// Views per atomic batch (one group commit). At sled's default segment size its memory steps
    /// up between 1,200 and 2,000 inserts per batch (docs/benchmarks.md, "Parts of 2,048 views,
    /// and what holds the memory"): its epoch collector falling behind (`--epoch-collections`).
    #[arg(long, default_value_t = 2_000)]
    batch: u64,
    /// sled's segment size in KiB: a power of two up to 16,384; 512 is sled's default, which the
    /// service keeps (sled calls the setting a testing one, and a store keeps the size it was
    /// created with). At 128 and below the growth past the cache bound goes away here, not in
    /// the service (docs/benchmarks.md, "sled's segment size, a write taken sooner, fetches thrown
    /// away").
    #[arg(long, default_value_t = 512)]
    segment_kib: usize,
    /// Rounds of epoch garbage collection after each batch (0: as sled leaves it). sled hands
    /// every node it replaces to crossbeam-epoch, which frees at most 512 items per collection
    /// and collects at every 128th pin of a thread; a batch of thousands of inserts under one pin
    /// leaves more than that, and here, with no other thread pinning, the old nodes pile up
    /// (docs/benchmarks.md, "The broker in a process of its own, and sled's epoch garbage").
    #[arg(long, default_value_t = 0)]
    epoch_collections: u64,
    /// Directory of the store; a temporary one when unset.
    #[arg(long)]
    path: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let o = Options::parse();
    anyhow::ensure!(
        o.keys > 0 && o.batch > 0,
        "--keys and --batch must be above 0"
    );
    anyhow::ensure!(
        o.segment_kib.is_power_of_two() && o.segment_kib <= 16_384,
        "--segment-kib must be a power of two up to 16384, not {}",
        o.segment_kib
    );
    let temp = tempfile::tempdir().context("creating a temporary directory")?;
    let path = o.path.clone().unwrap_or_else(|| temp.path().join("store"));
    let db = sled::Config::new()
        .path(&path)
        .cache_capacity(o.cache_mib * 1024 * 1024)
        .flush_every_ms(None)
        .segment_size(o.segment_kib * 1024)
        .open()
        .with_context(|| format!("opening {}", path.display()))?;
    let value = vec![7u8; o.value_bytes];
    // xorshift64: uniform keys without a dependency's state in the measured process.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let started = Instant::now();
    let mut written = 0;
    let report_every = (o.writes / 10).max(1);
    while written < o.writes {
        let mut batch = sled::Batch::default();
        for _ in 0..o.batch.min(o.writes - written) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            batch.insert(
                format!("v/customer-{:08}", x % o.keys).as_bytes(),
                value.as_slice(),
            );
            written += 1;
            if written % report_every == 0 {
                eprintln!(
                    "{written} written, peak RSS {} MiB, {:.1} s",
                    aggregator::bench::peak_rss_kib() / 1024,
                    started.elapsed().as_secs_f64()
                );
            }
        }
        db.apply_batch(batch).context("writing a batch")?;
        db.flush().context("flushing")?;
        for _ in 0..o.epoch_collections {
            crossbeam_epoch::pin().flush();
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "keys {} | writes {} | value {} bytes | cache {} MiB | batch {} | segment {} KiB | epoch \
         collections {}: peak RSS {} MiB, {:.0} writes/s",
        o.keys,
        o.writes,
        o.value_bytes,
        o.cache_mib,
        o.batch,
        o.segment_kib,
        o.epoch_collections,
        aggregator::bench::peak_rss_kib() / 1024,
        o.writes as f64 / seconds
    );
    Ok(())
}
