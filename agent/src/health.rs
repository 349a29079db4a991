//! Active health checks of targets, and the health stream gateways read them from.
//!
//! [`Verdict`] is the sans-IO core: it is fed each check's outcome and says when a target turns
//! unhealthy (after `unhealthy_threshold` failures in a row) or healthy again (after
//! `healthy_threshold` successes in a row). A target starts healthy, so that a new target serves
//! at once; its first check runs as soon as the snapshot is applied.
//!
//! [`HealthChecks`] is the shell: one task per checked target (a TCP connect, or an HTTP `GET`
//! on a fresh connection with the resource's hostname as `Host`), reconciled on every snapshot,
//! publishing the set of unhealthy ports on a `watch` channel. Every gateway keeps a health
//! stream open to the agent ([`kakuremichi_proto::StreamKind::Health`]) and receives a
//! [`HealthReport`] line at once, on every change and every heartbeat; the data plane needs no
//! control for it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{header, Request};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use kakuremichi_proto::{HealthCheck, HealthReport, Target, HEALTH_HEARTBEAT_MS};
use tokio::io::{AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::Instrument as _;

/// The health of one target, from the outcomes of its checks in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    healthy: bool,
    streak: u8,
}

impl Default for Verdict {
    fn default() -> Self {
        Verdict {
            healthy: true,
            streak: 0,
        }
    }
}

impl Verdict {
    /// Whether the target takes traffic.
    pub fn healthy(&self) -> bool {
        self.healthy
    }

    /// Records one check's outcome; true when the verdict flips.
    pub fn record(&mut self, ok: bool, check: &HealthCheck) -> bool {
        if ok == self.healthy {
            self.streak = 0;
            return false;
        }
        self.streak = self.streak.saturating_add(1);
        let needed = if self.healthy {
            check.unhealthy_threshold
        } else {
            check.healthy_threshold
        };
        if self.streak >= needed.max(1) {
            self.healthy = ok;
            self.streak = 0;
            true
        } else {
            false
        }
    }
}

/// Runs one check against `target`: `Ok` if healthy, else why not.
pub async fn check_once(target: &Target, check: &HealthCheck) -> Result<(), String> {
    let timeout = Duration::from_millis(u64::from(check.timeout_ms.max(1)));
    match tokio::time::timeout(timeout, probe(target, check)).await {
        Ok(r) => r,
        Err(_) => Err(format!(
            "the health check took longer than {} ms",
            check.timeout_ms
        )),
    }
}

async fn probe(target: &Target, check: &HealthCheck) -> Result<(), String> {
    let tcp = TcpStream::connect(target.target.as_str())
        .await
        .map_err(|e| format!("connecting failed: {e}"))?;
    let Some(path) = check.path.as_deref() else {
        return Ok(());
    };
    let _ = tcp.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| format!("HTTP handshake failed: {e}"))?;
    let conn = tokio::spawn(conn);
    let host = if target.hostname.is_empty() {
        target.target.as_str()
    } else {
        target.hostname.as_str()
    };
    let req = Request::get(path)
        .header(header::HOST, host)
        .header(header::USER_AGENT, "kakuremichi-health-check")
        .header(header::CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("bad health check request: {e}"))?;
    let response = sender
        .send_request(req)
        .await
        .map_err(|e| format!("HTTP request failed: {e}"));
    conn.abort();
    let status = response?.status().as_u16();
    let ok = match check.expected_status {
        Some(want) => status == want,
        None => (200..400).contains(&status),
    };
    if ok {
        Ok(())
    } else {
        Err(format!("the health check answered {status}"))
    }
}

/// Health of the agent's targets, shared with the health streams.
pub struct HealthChecks {
    report: watch::Sender<Arc<HealthReport>>,
    state: Mutex<ChecksState>,
}

#[derive(Default)]
struct ChecksState {
    /// Port -> (the target checked, its task).
    tasks: HashMap<u16, (Target, JoinHandle<()>)>,
    /// Port -> the last error of a failing check.
    failing: BTreeMap<u16, String>,
}

impl std::fmt::Debug for HealthChecks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HealthChecks")
            .field("report", &*self.report.borrow())
            .finish_non_exhaustive()
    }
}

impl Default for HealthChecks {
    fn default() -> Self {
        HealthChecks {
            report: watch::Sender::new(Arc::new(HealthReport::default())),
            state: Mutex::new(ChecksState::default()),
        }
    }
}

impl HealthChecks {
    /// Starts checks for new or changed checked targets and stops those of removed ones.
    pub fn reconcile(self: &Arc<Self>, targets: &[Target]) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let wanted: HashMap<u16, &Target> = targets
            .iter()
            .filter(|t| t.health_check.is_some())
            .map(|t| (t.port, t))
            .collect();
        st.tasks.retain(|port, (old, task)| {
            let keep = wanted.get(port).is_some_and(|t| *t == old);
            if !keep {
                task.abort();
            }
            keep
        });
        let live: BTreeSet<u16> = wanted.keys().copied().collect();
        for (port, target) in wanted {
            if st.tasks.contains_key(&port) {
                continue;
            }
            // A changed target starts over as healthy.
            st.failing.remove(&port);
            let me = Arc::clone(self);
            let t = target.clone();
            let span = tracing::debug_span!("health_check", resource_id = %t.resource_id, port);
            let task = tokio::spawn(me.run(t).instrument(span));
            st.tasks.insert(port, (target.clone(), task));
        }
        st.failing.retain(|p, _| live.contains(p));
        self.publish(&st);
    }

    fn publish(&self, st: &ChecksState) {
        let unhealthy_ports: Vec<u16> = st.failing.keys().copied().collect();
        self.report.send_if_modified(|r| {
            if r.unhealthy_ports == unhealthy_ports {
                false
            } else {
                *r = Arc::new(HealthReport { unhealthy_ports });
                true
            }
        });
    }

    async fn run(self: Arc<Self>, target: Target) {
        let Some(check) = target.health_check.clone() else {
            return;
        };
        let interval = Duration::from_millis(u64::from(check.interval_ms.max(1)));
        let mut verdict = Verdict::default();
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let outcome = check_once(&target, &check).await;
            let flipped = verdict.record(outcome.is_ok(), &check);
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if verdict.healthy() {
                st.failing.remove(&target.port);
            } else if let Err(e) = &outcome {
                st.failing.insert(target.port, e.clone());
            }
            if flipped {
                if verdict.healthy() {
                    tracing::info!(target = %target.target, "target healthy again");
                } else {
                    tracing::warn!(target = %target.target, error = ?outcome.as_ref().err(), "target unhealthy");
                }
            }
            self.publish(&st);
        }
    }

    /// The failing check's error of a port, if its target is unhealthy.
    pub fn failing(&self, port: u16) -> Option<String> {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .failing
            .get(&port)
            .cloned()
    }

    /// Whether a port's target has an active check.
    pub fn checked(&self, port: u16) -> bool {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .tasks
            .contains_key(&port)
    }

    /// Stops every check.
    pub fn stop(&self) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        for (_, (_, task)) in st.tasks.drain() {
            task.abort();
        }
    }

    /// Writes health reports to a gateway's health stream until it goes away: one at once, one
    /// on every change, one every heartbeat.
    pub async fn serve_stream<W: AsyncWrite + Unpin>(&self, mut out: W) {
        let mut rx = self.report.subscribe();
        let heartbeat = Duration::from_millis(HEALTH_HEARTBEAT_MS);
        loop {
            let report = Arc::clone(&rx.borrow_and_update());
            let mut line = match serde_json::to_vec(&*report) {
                Ok(l) => l,
                Err(_) => return,
            };
            line.push(b'\n');
            if out.write_all(&line).await.is_err() || out.flush().await.is_err() {
                tracing::debug!("health stream closed by the gateway");
                return;
            }
            tokio::select! {
                changed = rx.changed() => if changed.is_err() { return },
                () = tokio::time::sleep(heartbeat) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    fn check(unhealthy: u8, healthy: u8) -> HealthCheck {
        HealthCheck {
            path: None,
            expected_status: None,
            interval_ms: 1000,
            timeout_ms: 500,
            unhealthy_threshold: unhealthy,
            healthy_threshold: healthy,
        }
    }

    #[test]
    fn thresholds_flip_the_verdict_only_on_a_streak() {
        let c = check(2, 3);
        let mut v = Verdict::default();
        assert!(v.healthy());
        assert!(!v.record(false, &c));
        assert!(!v.record(true, &c), "a success breaks the failure streak");
        assert!(!v.record(false, &c));
        assert!(v.record(false, &c));
        assert!(!v.healthy());
        assert!(!v.record(true, &c));
        assert!(!v.record(true, &c));
        assert!(!v.record(false, &c), "a failure breaks the success streak");
        assert!(!v.record(true, &c));
        assert!(!v.record(true, &c));
        assert!(v.record(true, &c));
        assert!(v.healthy());
    }

    #[test]
    fn a_threshold_of_one_flips_at_once() {
        let c = check(1, 1);
        let mut v = Verdict::default();
        assert!(v.record(false, &c));
        assert!(v.record(true, &c));
        let zero = check(0, 0);
        assert!(v.record(false, &zero), "0 counts as 1");
    }

    fn target(addr: &str, path: Option<&str>, expected: Option<u16>) -> Target {
        let mut c = check(1, 1);
        c.path = path.map(str::to_owned);
        c.expected_status = expected;
        Target {
            resource_id: Uuid::nil(),
            port: 1,
            target: addr.into(),
            health_check: Some(c),
            hostname: "app.example".into(),
        }
    }

    async fn http_server(status: u16) -> (String, tokio::task::JoinHandle<()>) {
        use tokio::io::AsyncReadExt as _;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                let mut buf = [0u8; 1024];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]).to_string();
                let status = if req.contains("host: app.example") {
                    status
                } else {
                    421
                };
                let _ = s
                    .write_all(
                        format!("HTTP/1.1 {status} X\r\ncontent-length: 0\r\n\r\n").as_bytes(),
                    )
                    .await;
            }
        });
        (addr, task)
    }

    #[tokio::test]
    async fn checks_tcp_and_http_targets() {
        let (addr, _server) = http_server(204).await;
        let t = target(&addr, None, None);
        assert_eq!(
            check_once(&t, t.health_check.as_ref().unwrap()).await,
            Ok(())
        );
        let t = target(&addr, Some("/healthz"), None);
        assert_eq!(
            check_once(&t, t.health_check.as_ref().unwrap()).await,
            Ok(())
        );
        let t = target(&addr, Some("/healthz"), Some(200));
        let e = check_once(&t, t.health_check.as_ref().unwrap())
            .await
            .unwrap_err();
        assert!(e.contains("204"), "{e}");
        let (addr, _server) = http_server(503).await;
        let t = target(&addr, Some("/"), None);
        assert!(check_once(&t, t.health_check.as_ref().unwrap())
            .await
            .is_err());
        // Nothing listens there.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = closed.local_addr().unwrap().to_string();
        drop(closed);
        let t = target(&addr, None, None);
        let e = check_once(&t, t.health_check.as_ref().unwrap())
            .await
            .unwrap_err();
        assert!(e.contains("connecting failed"), "{e}");
    }

    #[tokio::test]
    async fn a_failing_target_is_reported_and_recovers() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let mut t = target(&addr.to_string(), None, None);
        if let Some(c) = t.health_check.as_mut() {
            c.interval_ms = 50;
        }
        let checks = Arc::new(HealthChecks::default());
        let mut rx = checks.report.subscribe();
        checks.reconcile(std::slice::from_ref(&t));
        tokio::time::timeout(Duration::from_secs(5), async {
            while rx.borrow_and_update().unhealthy_ports != vec![1] {
                rx.changed().await.unwrap();
            }
        })
        .await
        .expect("reported unhealthy");
        assert!(checks.failing(1).is_some());
        let _back = tokio::net::TcpListener::bind(addr).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), async {
            while !rx.borrow_and_update().unhealthy_ports.is_empty() {
                rx.changed().await.unwrap();
            }
        })
        .await
        .expect("healthy again");
        // Removing the target stops its check.
        checks.reconcile(&[]);
        assert!(!checks.checked(1));
        // The stream writes the current report as a JSON line at once.
        let (client, mut server) = tokio::io::duplex(1024);
        let serving = tokio::spawn({
            let checks = Arc::clone(&checks);
            async move { checks.serve_stream(client).await }
        });
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        use tokio::io::AsyncReadExt as _;
        while server.read_exact(&mut byte).await.is_ok() && byte[0] != b'\n' {
            line.push(byte[0]);
        }
        assert_eq!(
            serde_json::from_slice::<HealthReport>(&line).unwrap(),
            HealthReport::default()
        );
        drop(server);
        tokio::time::timeout(Duration::from_secs(5), serving)
            .await
            .expect("the stream ends when the gateway goes away")
            .unwrap();
    }
}
