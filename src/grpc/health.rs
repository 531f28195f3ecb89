use std::time::Duration;

use tonic_health::{ServingStatus, server::HealthReporter};

use super::SERVICE_NAME;
use crate::store::{DatabaseHealth, Store};

/// The health entry that is SERVING only while the whole database answers,
/// every Citus worker included.
pub const DATABASE_HEALTH_NAME: &str = "convo.database";

/// Keeps gRPC health in step with the database: `""` and the service are
/// SERVING only while a query succeeds, NOT_SERVING otherwise.
/// [`DATABASE_HEALTH_NAME`] is SERVING only while every part of the database
/// answers: on Citus, a lost worker makes it NOT_SERVING while `""` and the
/// service stay SERVING, since the users on the other workers are still
/// served and every replica sees the same cluster (taking them all out of a
/// load balancer would turn part of an outage into all of it).
///
/// Probes every `interval` on a session of its own (a busy pool is not an
/// outage) until the task is dropped; logs only when the state changes.
/// Publishes the pool's metrics on the same beat.
pub async fn watch_database_health(store: Store, reporter: HealthReporter, interval: Duration) {
    let mut last: Option<Result<DatabaseHealth, ()>> = None;
    let mut probe = store.health_probe(interval.max(Duration::from_secs(1)));
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        store.record_pool_metrics();
        let now = match probe.check().await {
            Ok(health) => Ok(health),
            Err(error) => {
                if last != Some(Err(())) {
                    tracing::warn!(%error, "database health check failed");
                }
                Err(())
            }
        };
        let unreachable = match &now {
            Ok(DatabaseHealth::Degraded { unreachable }) => unreachable.len(),
            _ => 0,
        };
        metrics::gauge!("convo_database_unreachable_nodes").set(unreachable as f64);
        if last.as_ref() == Some(&now) {
            continue;
        }
        let (serving, whole) = match &now {
            Ok(DatabaseHealth::Whole) => {
                tracing::info!("database reachable: serving");
                (ServingStatus::Serving, ServingStatus::Serving)
            }
            Ok(DatabaseHealth::Degraded { unreachable }) => {
                tracing::warn!(
                    ?unreachable,
                    "database workers unreachable: their users get UNAVAILABLE"
                );
                (ServingStatus::Serving, ServingStatus::NotServing)
            }
            Err(()) => (ServingStatus::NotServing, ServingStatus::NotServing),
        };
        reporter.set_service_status("", serving).await;
        reporter.set_service_status(SERVICE_NAME, serving).await;
        reporter
            .set_service_status(DATABASE_HEALTH_NAME, whole)
            .await;
        last = Some(now);
    }
}
