use std::time::Duration;

use tonic_health::{ServingStatus, server::HealthReporter};

use super::SERVICE_NAME;
use crate::store::Store;

/// Keeps gRPC health in step with the database: `""` and the service are
/// SERVING only while a query succeeds, NOT_SERVING otherwise. Probes every
/// `interval` on a session of its own (a busy pool is not an outage) until
/// the task is dropped; logs only when the status changes. Publishes the
/// pool's metrics on the same beat.
pub async fn watch_database_health(store: Store, reporter: HealthReporter, interval: Duration) {
    let mut last: Option<ServingStatus> = None;
    let mut probe = store.health_probe(interval.max(Duration::from_secs(1)));
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        store.record_pool_metrics();
        let status = match probe.check().await {
            Ok(()) => ServingStatus::Serving,
            Err(error) => {
                if last != Some(ServingStatus::NotServing) {
                    tracing::warn!(%error, "database health check failed");
                }
                ServingStatus::NotServing
            }
        };
        if last != Some(status) {
            if status == ServingStatus::Serving {
                tracing::info!("database reachable: serving");
            }
            reporter.set_service_status("", status).await;
            reporter.set_service_status(SERVICE_NAME, status).await;
            last = Some(status);
        }
    }
}
