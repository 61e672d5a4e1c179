//! A small gRPC service for bluegreen's gRPC tests: answers with its color, streams, and reports its health.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_stream::Stream;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::transport::{Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status};

pub mod echo {
    tonic::include_proto!("bluegreen.echo");
}

pub mod health {
    tonic::include_proto!("grpc.health.v1");
}

use echo::echo_server::{Echo, EchoServer};
use echo::{CountReply, CountRequest, SayReply, SayRequest};
use health::health_check_response::ServingStatus;
use health::health_server::{Health, HealthServer};
use health::{HealthCheckRequest, HealthCheckResponse};

/// One instance on a loopback port, until dropped.
pub struct Instance {
    pub addr: SocketAddr,
    serving: Arc<AtomicBool>,
    failing: Arc<AtomicBool>,
    server: JoinHandle<()>,
}

impl Instance {
    /// Serves h2c (HTTP/2 without TLS), or h2 over TLS with `tls` (certificate chain and key,
    /// PEM), answering as `color`.
    pub async fn start(color: &str, tls: Option<(String, String)>) -> Instance {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local address");
        let service = Service {
            color: color.to_string(),
            serving: Arc::new(AtomicBool::new(true)),
            failing: Arc::new(AtomicBool::new(false)),
        };
        let serving = Arc::clone(&service.serving);
        let failing = Arc::clone(&service.failing);
        let mut builder = Server::builder();
        if let Some((cert, key)) = tls {
            builder = builder
                .tls_config(ServerTlsConfig::new().identity(Identity::from_pem(cert, key)))
                .expect("TLS config");
        }
        let router = builder
            .add_service(EchoServer::new(service.clone()))
            .add_service(HealthServer::new(service));
        let server = tokio::spawn(async move {
            let _ = router
                .serve_with_incoming(TcpListenerStream::new(listener))
                .await;
        });
        Instance {
            addr,
            serving,
            failing,
            server,
        }
    }

    /// From now on `Say` answers every call with INTERNAL (a broken build whose HTTP answers
    /// still look fine: 200, the status in the trailers).
    pub fn set_failing(&self, failing: bool) {
        self.failing.store(failing, Ordering::SeqCst);
    }

    /// What `grpc.health.v1.Health/Check` answers from now on.
    pub fn set_serving(&self, serving: bool) {
        self.serving.store(serving, Ordering::SeqCst);
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.server.abort();
    }
}

#[derive(Clone)]
struct Service {
    color: String,
    serving: Arc<AtomicBool>,
    failing: Arc<AtomicBool>,
}

type CountStream = Pin<Box<dyn Stream<Item = Result<CountReply, Status>> + Send>>;

#[tonic::async_trait]
impl Echo for Service {
    async fn say(&self, request: Request<SayRequest>) -> Result<Response<SayReply>, Status> {
        let text = request.into_inner().text;
        if self.failing.load(Ordering::SeqCst) {
            return Err(Status::internal(format!("{} is broken", self.color)));
        }
        if text == "fail" {
            return Err(Status::invalid_argument(format!(
                "{} was asked to fail",
                self.color
            )));
        }
        Ok(Response::new(SayReply {
            text,
            color: self.color.clone(),
        }))
    }

    type CountStream = CountStream;

    async fn count(&self, request: Request<CountRequest>) -> Result<Response<CountStream>, Status> {
        let CountRequest { count, interval_ms } = request.into_inner();
        let (replies, stream) = tokio::sync::mpsc::channel(4);
        let color = self.color.clone();
        tokio::spawn(async move {
            for n in 1..=count {
                let reply = CountReply {
                    n,
                    color: color.clone(),
                };
                if replies.send(Ok(reply)).await.is_err() {
                    return; // the caller went away
                }
                tokio::time::sleep(Duration::from_millis(u64::from(interval_ms))).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(stream))))
    }
}

#[tonic::async_trait]
impl Health for Service {
    async fn check(
        &self,
        _request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        let status = match self.serving.load(Ordering::SeqCst) {
            true => ServingStatus::Serving,
            false => ServingStatus::NotServing,
        };
        Ok(Response::new(HealthCheckResponse {
            status: status as i32,
        }))
    }
}
