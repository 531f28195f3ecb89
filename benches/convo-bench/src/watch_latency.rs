//! Watch delivery latency at a fixed append rate: appends go to one server,
//! watchers listen on another (or the same), and every message's time from
//! the moment its append was sent to the moment its watcher received it is
//! recorded. Every stream is checked for gaps and duplicates.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use clap::Args;
use convo::grpc::proto::{self, AppendMessageRequest, Role, WatchConversationRequest};
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio_stream::StreamExt;

use crate::{BoxError, workload::Target};

#[derive(Debug, Args)]
pub struct WatchLatencyArgs {
    /// The server the appends go to.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    writer: String,
    /// The server the watchers listen on (the writer itself, or another replica).
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    watcher: String,
    /// Conversations, each with one watcher.
    #[arg(long, default_value_t = 64)]
    conversations: usize,
    /// Appends per second, over all conversations.
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// How long to append for.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// HTTP/2 connections to each server.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
struct WatchLatencyReport {
    rate: u64,
    conversations: usize,
    seconds: f64,
    appended: u64,
    delivered: u64,
    append_errors: u64,
    gaps: u64,
    duplicates: u64,
    missing: u64,
    append_p50_ms: f64,
    append_p99_ms: f64,
    delivery_p50_ms: f64,
    delivery_p90_ms: f64,
    delivery_p99_ms: f64,
    delivery_max_ms: f64,
    /// From the append's reply to the watcher's receipt (0 when the watcher
    /// had it first): the watch path alone, without the append's own time.
    after_ack_p50_ms: f64,
    after_ack_p99_ms: f64,
    after_ack_max_ms: f64,
}

pub async fn run(args: WatchLatencyArgs) -> Result<(), BoxError> {
    let writer = Target::connect(&args.writer, args.connections).await?;
    let watcher = Target::connect(&args.watcher, args.connections).await?;
    let user = format!("watch-{}", uuid::Uuid::now_v7().simple());
    let mut ids = Vec::with_capacity(args.conversations);
    for i in 0..args.conversations {
        let created = writer
            .client(i, &user)?
            .create_conversation(proto::CreateConversationRequest {
                title: format!("watched {i}"),
                ..Default::default()
            })
            .await?
            .into_inner();
        ids.push(created.id);
    }

    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut watchers = Vec::new();
    for (index, id) in ids.iter().enumerate() {
        let mut stream = watcher
            .client(index, &user)?
            .watch_conversation(WatchConversationRequest {
                conversation_id: id.clone(),
                after_sequence: 0,
            })
            .await?
            .into_inner();
        let mut stopped = stopped.clone();
        watchers.push(tokio::spawn(async move {
            let mut received = Received::default();
            let mut expected = 1;
            loop {
                let message = tokio::select! {
                    next = stream.next() => match next {
                        Some(Ok(message)) => message,
                        _ => break,
                    },
                    _ = stopped.changed() => break,
                };
                let now = Instant::now();
                if message.sequence < expected {
                    received.duplicates += 1;
                    continue;
                }
                if message.sequence > expected {
                    received.gaps += 1;
                }
                expected = message.sequence + 1;
                received.arrivals.push((message.content, now));
            }
            received
        }));
    }
    // Let the streams start before the clock does.
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Receipts are matched by content, unique per append, so a message seen
    // before its append's reply came is still timed from its send.
    let sent_at: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let acked_at: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
    let period = Duration::from_secs_f64(1.0 / args.rate.max(1) as f64);
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = Instant::now();
    let mut n: u64 = 0;
    // Open loop: an append leaves at every tick whatever the earlier ones
    // are doing, so a slow server shows as latency, not as a lower rate.
    while started.elapsed() < args.duration {
        ticker.tick().await;
        let index = (n % args.conversations as u64) as usize;
        let content = format!("c{index}-n{n}");
        let mut client = writer.client(n as usize, &user)?;
        n += 1;
        let request = AppendMessageRequest {
            conversation_id: ids[index].clone(),
            role: Role::User as i32,
            content: content.clone(),
            ..Default::default()
        };
        let sent_at = sent_at.clone();
        let acked_at = acked_at.clone();
        let done = done_tx.clone();
        tokio::spawn(async move {
            let sent = Instant::now();
            sent_at
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(content.clone(), sent);
            let outcome = client.append_message(request).await;
            acked_at
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(content, Instant::now());
            let _ = done.send((outcome.is_ok(), sent.elapsed()));
        });
    }
    drop(done_tx);
    let mut append_latency = Histogram::<u64>::new(3)?;
    let mut append_errors = 0u64;
    while let Some((ok, took)) = done_rx.recv().await {
        if ok {
            append_latency.record(took.as_micros() as u64)?;
        } else {
            append_errors += 1;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    // Give the last messages time to arrive, then end the streams.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let _ = stop.send(true);
    let sent_at = std::mem::take(&mut *sent_at.lock().unwrap_or_else(|p| p.into_inner()));
    let acked_at = std::mem::take(&mut *acked_at.lock().unwrap_or_else(|p| p.into_inner()));
    let mut delivery = Histogram::<u64>::new(3)?;
    let mut after_ack = Histogram::<u64>::new(3)?;
    let mut total = Received::default();
    for handle in watchers {
        let received = handle.await?;
        total.gaps += received.gaps;
        total.duplicates += received.duplicates;
        for (content, at) in received.arrivals {
            if let Some(sent) = sent_at.get(&content) {
                delivery.record(at.saturating_duration_since(*sent).as_micros() as u64)?;
            }
            if let Some(acked) = acked_at.get(&content) {
                after_ack.record(at.saturating_duration_since(*acked).as_micros() as u64)?;
            }
            total.arrivals.push((content, at));
        }
    }
    let appended = append_latency.len();
    let delivered = total.arrivals.len() as u64;
    let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let report = WatchLatencyReport {
        rate: args.rate,
        conversations: args.conversations,
        seconds,
        appended,
        delivered,
        append_errors,
        gaps: total.gaps,
        duplicates: total.duplicates,
        missing: appended.saturating_sub(delivered),
        append_p50_ms: ms(&append_latency, 0.5),
        append_p99_ms: ms(&append_latency, 0.99),
        delivery_p50_ms: ms(&delivery, 0.5),
        delivery_p90_ms: ms(&delivery, 0.9),
        delivery_p99_ms: ms(&delivery, 0.99),
        delivery_max_ms: delivery.max() as f64 / 1000.0,
        after_ack_p50_ms: ms(&after_ack, 0.5),
        after_ack_p99_ms: ms(&after_ack, 0.99),
        after_ack_max_ms: after_ack.max() as f64 / 1000.0,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "watch {} -> {}: {} appends/s over {} conversations for {:.0} s",
            args.writer, args.watcher, report.rate, report.conversations, report.seconds
        );
        println!(
            "  appended {} (errors {}), delivered {}, missing {}, gaps {}, duplicates {}",
            report.appended,
            report.append_errors,
            report.delivered,
            report.missing,
            report.gaps,
            report.duplicates
        );
        println!(
            "  append p50 {:.2} ms p99 {:.2} ms; delivery (send to receipt) p50 {:.2} ms p90 {:.2} ms p99 {:.2} ms max {:.2} ms",
            report.append_p50_ms,
            report.append_p99_ms,
            report.delivery_p50_ms,
            report.delivery_p90_ms,
            report.delivery_p99_ms,
            report.delivery_max_ms
        );
        println!(
            "  after the append's reply: p50 {:.2} ms p99 {:.2} ms max {:.2} ms",
            report.after_ack_p50_ms, report.after_ack_p99_ms, report.after_ack_max_ms
        );
    }
    Ok(())
}

/// What one watcher saw.
#[derive(Default)]
struct Received {
    arrivals: Vec<(String, Instant)>,
    gaps: u64,
    duplicates: u64,
}
