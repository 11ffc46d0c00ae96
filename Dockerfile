# sip-relay's image: the relay, the app-server-agent (and its demo shop) and client-agent.
#   docker build -t sip-relay .
# Stage 1 builds them with the Rust toolchain; stage 2 is a slim Debian running as a non-root
# user, with curl for health checks.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p relay -p app-server-agent -p client-agent \
    && mkdir /out \
    && cp target/release/relay target/release/app-server-agent target/release/client-agent /out/

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /var/lib/sip-relay --create-home sip-relay \
    && mkdir /shared && chown sip-relay:sip-relay /shared
COPY --from=build /out/ /usr/local/bin/
COPY contrib/compose/ /usr/local/share/sip-relay/compose/
USER sip-relay
WORKDIR /var/lib/sip-relay
ENV NO_COLOR=1
EXPOSE 5060/udp 5060/tcp 50051/tcp 9090/tcp
CMD ["relay", "serve"]
