//! The relay's gRPC endpoint (`relay serve --grpc ADDR`): `relay.v1.Billing`, the standard
//! health service (`grpc.health.v1.Health`) and reflection. The only module of the relay that
//! sees tonic.
//!
//! Every call carries `authorization: Bearer TOKEN`, a token made by `relay appserver token
//! NAME`; the relay keeps only its SHA-256 and knows the caller as that application server. A
//! caller sees only its own: its charges, the lines of its sessions in a user's statement, its
//! settlement.
use std::net::SocketAddr;

use proto::grpc::relay_v1 as v1;
use tonic::{Request, Response, Status};

use crate::charging::Charging;
use crate::ledger::report;
use crate::store::{Cdr, Channel, Store, Submission};

/// Most charges in one `ReportCharges` call.
pub const MAX_CHARGES_PER_CALL: usize = 10_000;

/// The billing service.
pub struct Billing {
    store: Store,
    charging: Charging,
}

impl Billing {
    pub fn new(store: Store, charging: Charging) -> Billing {
        Billing { store, charging }
    }

    /// The application server a call comes from, by its bearer token.
    async fn caller<T>(&self, req: &Request<T>) -> Result<String, Status> {
        let value = req
            .metadata()
            .get("authorization")
            .ok_or_else(|| {
                Status::unauthenticated(
                    "no authorization: send `authorization: Bearer TOKEN` (relay appserver token NAME)",
                )
            })?
            .to_str()
            .map_err(|_| Status::unauthenticated("the authorization value is not text"))?;
        let token = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .ok_or_else(|| Status::unauthenticated("authorization is not `Bearer TOKEN`"))?;
        let hash = crate::ledger::token_sha256(token);
        match self.store.appserver_by_token(&hash).await {
            Ok(Some(name)) => Ok(name),
            Ok(None) => Err(Status::unauthenticated(
                "unknown token (a newer `relay appserver token` replaces the old one)",
            )),
            Err(e) => Err(Status::unavailable(format!(
                "the relay's store failed: {e}"
            ))),
        }
    }
}

fn window(from: Option<i64>, to: Option<i64>) -> Result<(), Status> {
    if let (Some(f), Some(t)) = (from, to)
        && f >= t
    {
        return Err(Status::invalid_argument("from_ms must be before to_ms"));
    }
    Ok(())
}

fn line(l: &report::Line) -> v1::StatementLine {
    v1::StatementLine {
        kind: l.kind.into(),
        session_id: l.session_id.clone(),
        service: l.service.clone().unwrap_or_default(),
        appserver: l.appserver.clone().unwrap_or_default(),
        at_ms: l.at_ms,
        item_id: l.item_id.clone().unwrap_or_default(),
        item_name: l.item_name.clone().unwrap_or_default(),
        quantity: l.quantity,
        unit_price_minor: l.unit_price_minor,
        amount_minor: l.amount_minor,
        currency: l.currency.clone(),
        duration_ms: l.duration_ms.unwrap_or_default(),
        billed_secs: l.billed_secs.unwrap_or_default(),
    }
}

fn store_failed(e: impl std::fmt::Display) -> Status {
    Status::unavailable(format!("the relay's store failed: {e}"))
}

#[tonic::async_trait]
impl v1::billing_server::Billing for Billing {
    async fn report_charges(
        &self,
        req: Request<v1::ReportChargesRequest>,
    ) -> Result<Response<v1::ReportChargesResponse>, Status> {
        let appserver = self.caller(&req).await?;
        let charges = req.into_inner().charges;
        if charges.len() > MAX_CHARGES_PER_CALL {
            return Err(Status::invalid_argument(format!(
                "{} charges in one call; at most {MAX_CHARGES_PER_CALL}",
                charges.len()
            )));
        }
        if let Some(c) = charges.iter().find(|c| !proto::grpc::known_kind(c)) {
            return Err(Status::invalid_argument(format!(
                "charge {:?}: unknown kind {}",
                c.idempotency_key, c.kind
            )));
        }
        let subs: Vec<Submission> = charges
            .into_iter()
            .map(|c| Submission {
                appserver: appserver.clone(),
                channel: Channel::Grpc,
                charge: c.into(),
            })
            .collect();
        let results = self
            .charging
            .submit(subs)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(Response::new(v1::ReportChargesResponse {
            results: results.into_iter().map(Into::into).collect(),
        }))
    }

    async fn statement(
        &self,
        req: Request<v1::StatementRequest>,
    ) -> Result<Response<v1::StatementResponse>, Status> {
        let appserver = self.caller(&req).await?;
        let r = req.into_inner();
        window(r.from_ms, r.to_ms)?;
        if r.user.trim().is_empty() {
            return Err(Status::invalid_argument("user is missing"));
        }
        let sessions: Vec<Cdr> = self
            .store
            .user_sessions(
                &r.user,
                r.from_ms.unwrap_or(i64::MIN),
                r.to_ms.unwrap_or(i64::MAX),
            )
            .await
            .map_err(store_failed)?
            .into_iter()
            .filter(|c| c.server.as_deref() == Some(appserver.as_str()))
            .collect();
        let charges = self
            .store
            .list_charges(Some(&r.user), Some(&appserver), r.from_ms, r.to_ms)
            .await
            .map_err(store_failed)?;
        let (lines, totals) = report::lines(&sessions, &charges);
        Ok(Response::new(v1::StatementResponse {
            user: r.user,
            lines: lines.iter().map(line).collect(),
            totals: totals
                .into_iter()
                .map(|t| v1::CurrencyTotal {
                    currency: t.currency,
                    total_minor: t.total_minor,
                })
                .collect(),
        }))
    }

    async fn settlement(
        &self,
        req: Request<v1::SettlementRequest>,
    ) -> Result<Response<v1::SettlementResponse>, Status> {
        let appserver = self.caller(&req).await?;
        let r = req.into_inner();
        window(r.from_ms, r.to_ms)?;
        if !r.appserver.is_empty() && r.appserver != appserver {
            return Err(Status::permission_denied(format!(
                "application server {appserver} may read only its own settlement, not {}",
                r.appserver
            )));
        }
        // The caller's token names an existing application server, unless it was removed
        // since: then there is nothing to settle.
        let (fee_bp, sessions, charges) = self
            .store
            .settlement_rows(&appserver, r.from_ms, r.to_ms)
            .await
            .map_err(store_failed)?
            .unwrap_or_default();
        let (_, totals) = report::lines(&sessions, &charges);
        Ok(Response::new(v1::SettlementResponse {
            appserver,
            fee_basis_points: fee_bp,
            totals: report::settle(totals, fee_bp)
                .into_iter()
                .map(|s| v1::SettlementTotal {
                    currency: s.total.currency,
                    time_minor: s.total.time_minor,
                    items_minor: s.total.items_minor,
                    refunds_minor: s.total.refunds_minor,
                    gross_minor: s.total.total_minor,
                    fee_minor: s.fee_minor,
                    net_minor: s.net_minor,
                    sessions: s.total.sessions,
                })
                .collect(),
        }))
    }
}

/// A bound gRPC listener, not yet serving.
pub struct Endpoint {
    listener: tokio::net::TcpListener,
    tls: Option<tonic::transport::ServerTlsConfig>,
}

impl Endpoint {
    /// Binds the address (port 0: any free port); with a certificate chain and key (PEM
    /// files), the endpoint speaks TLS; with a client certificate authority as well (PEM), every
    /// caller must present a certificate it signed (mutual TLS).
    pub async fn bind(
        addr: SocketAddr,
        tls: Option<(&std::path::Path, &std::path::Path)>,
        client_ca: Option<&std::path::Path>,
    ) -> anyhow::Result<Endpoint> {
        if client_ca.is_some() && tls.is_none() {
            anyhow::bail!(
                "grpc_tls_client_ca (--grpc-tls-client-ca) needs the endpoint's own certificate and key (--grpc-tls-cert, --grpc-tls-key)"
            );
        }
        let tls = match tls {
            Some((cert, key)) => {
                let read = |f: &std::path::Path| {
                    std::fs::read(f)
                        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", f.display()))
                };
                let identity = tonic::transport::Identity::from_pem(read(cert)?, read(key)?);
                let mut config = tonic::transport::ServerTlsConfig::new().identity(identity);
                if let Some(ca) = client_ca {
                    config =
                        config.client_ca_root(tonic::transport::Certificate::from_pem(read(ca)?));
                }
                // Unusable PEM is said now, naming the files, not once serving began.
                tonic::transport::Server::builder()
                    .tls_config(config.clone())
                    .map_err(|e| {
                        anyhow::anyhow!(
                            "the gRPC certificate {} and key {} are not usable: {e:?}",
                            cert.display(),
                            key.display()
                        )
                    })?;
                Some(config)
            }
            None => None,
        };
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen for gRPC on {addr}: {e}"))?;
        Ok(Endpoint { listener, tls })
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Serves billing, health and reflection until `stop` resolves.
    pub async fn serve(
        self,
        billing: Billing,
        stop: impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        let (reporter, health) = tonic_health::server::health_reporter();
        reporter
            .set_serving::<v1::billing_server::BillingServer<Billing>>()
            .await;
        let reflection = match tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::grpc::DESCRIPTOR_SET)
            .build_v1()
        {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!(error = %e, "gRPC reflection is not available");
                None
            }
        };
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = self.tls {
            builder = match builder.tls_config(tls) {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!(error = %e, "The gRPC endpoint's certificate or key is unusable: not serving");
                    return;
                }
            };
        }
        let server = builder
            .add_service(health)
            .add_optional_service(reflection)
            .add_service(v1::billing_server::BillingServer::new(billing));
        let incoming = tonic::transport::server::TcpIncoming::from(self.listener);
        if let Err(e) = server.serve_with_incoming_shutdown(incoming, stop).await {
            tracing::error!(error = %e, "The gRPC endpoint stopped");
        }
    }
}
