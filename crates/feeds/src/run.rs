//! The feeds as tasks: each polls on its own period and hands what it read, or why it failed,
//! to the engine shell. A failed poll is retried at the next period (a feed never stops on its
//! own); stopping ends every task within one of its waits.

use std::sync::Arc;
use std::time::Duration;

use hcp_engine::io::Input;
use hcp_model::SimTime;
use tokio::sync::{mpsc, watch};

use crate::config::FeedsConfig;
use crate::ercot::ErcotFeed;
use crate::mempool::MarketFeed;
use crate::replay::ReplayFeed;

/// Market time now (the shell's clock: wall clock at the market's offset, or a rehearsal's).
pub type Clock = Arc<dyn Fn() -> SimTime + Send + Sync>;

/// One poll's result.
#[derive(Debug)]
pub struct FeedMsg {
    pub feed: String,
    pub result: Result<Vec<Input>, String>,
}

enum Feed {
    Ercot(Box<ErcotFeed>),
    Market(MarketFeed),
    Replay(Box<ReplayFeed>),
    Gpu { name: String, usd: f64 },
}

impl Feed {
    fn every(&self) -> Duration {
        match self {
            Feed::Ercot(f) => f.poll_every(),
            Feed::Market(f) => f.poll_every(),
            Feed::Replay(f) => f.poll_every(),
            Feed::Gpu { .. } => Duration::from_secs(3600),
        }
    }

    async fn poll(&mut self, now: SimTime) -> Result<Vec<Input>, String> {
        match self {
            Feed::Ercot(f) => f.poll(now).await.map_err(|e| e.to_string()),
            Feed::Market(f) => f.poll(now).await.map_err(|e| e.to_string()),
            Feed::Replay(f) => f.poll(now).map_err(|e| e.to_string()),
            Feed::Gpu { name, usd } => Ok(vec![Input::GpuPrice { usd_per_gpu_hour: *usd, source: name.clone() }]),
        }
    }
}

/// Starts a task per configured feed; `fleet_points` are asked for when a feed names none.
/// Errors in the configuration (a replay file that does not parse, credentials half set) stop
/// the start with the feed named.
pub fn spawn(
    cfg: &FeedsConfig,
    fleet_points: &[String],
    clock: Clock,
    tx: mpsc::Sender<FeedMsg>,
    stop: watch::Receiver<bool>,
) -> Result<Vec<tokio::task::JoinHandle<()>>, String> {
    let mut feeds: Vec<(String, Feed)> = vec![];
    if let Some(e) = &cfg.ercot {
        let mut e = e.clone();
        if e.settlement_points.is_empty() {
            e.settlement_points = fleet_points.to_vec();
        }
        let name = e.name.clone();
        feeds.push((name.clone(), Feed::Ercot(Box::new(ErcotFeed::new(e).map_err(|x| format!("{name}: {x}"))?))));
    }
    if let Some(m) = &cfg.market {
        let name = m.name.clone();
        feeds.push((name.clone(), Feed::Market(MarketFeed::new(m.clone()).map_err(|x| format!("{name}: {x}"))?)));
    }
    for (i, r) in cfg.replay.iter().enumerate() {
        let f = ReplayFeed::new(r, clock()).map_err(|x| format!("replay[{i}]: {x}"))?;
        feeds.push((f.name().to_string(), Feed::Replay(Box::new(f))));
    }
    if let Some(g) = &cfg.gpu_price {
        feeds.push((g.name.clone(), Feed::Gpu { name: g.name.clone(), usd: g.usd_per_gpu_hour }));
    }
    Ok(feeds
        .into_iter()
        .map(|(name, mut feed)| {
            let (tx, mut stop, clock) = (tx.clone(), stop.clone(), clock.clone());
            tokio::spawn(async move {
                let every = feed.every();
                loop {
                    if *stop.borrow() {
                        return;
                    }
                    let result = tokio::select! {
                        r = feed.poll(clock()) => r,
                        _ = stop.changed() => return,
                    };
                    if let Err(why) = &result {
                        tracing::warn!(feed = %name, reason = %why, "feed poll failed");
                    }
                    if tx.send(FeedMsg { feed: name.clone(), result }).await.is_err() {
                        return;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(every) => {}
                        _ = stop.changed() => return,
                    }
                }
            })
        })
        .collect())
}
