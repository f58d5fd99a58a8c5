# Multi-stage: build the host and the reducer component, ship a slim image.
FROM rust:1.95-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential pkg-config libssl-dev zlib1g-dev python3 \
 && rm -rf /var/lib/apt/lists/* \
 && rustup target add wasm32-unknown-unknown
WORKDIR /src
COPY . .
# host/build.rs builds reducer/ for wasm32 and encodes it as a component.
RUN cargo build --release --locked -p logq \
 && cp target/reducer-wasm/components/reducer.wasm /reducer.wasm

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libssl3 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/logq /usr/local/bin/logq
COPY --from=build /reducer.wasm /opt/logq/reducer.wasm
ENV LOGQ_LISTEN=0.0.0.0:8080 \
    LOGQ_REDUCER=/opt/logq/reducer.wasm
EXPOSE 8080
USER 65534
ENTRYPOINT ["logq"]
CMD ["run"]
