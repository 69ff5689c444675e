# Images of gs-node, gs-router and cluster (one image, three binaries).
# Not built on the development machine (it has no Docker engine); see
# docker-compose.cluster.yml.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --bins

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/gs-node /src/target/release/gs-router /src/target/release/cluster /usr/local/bin/
COPY config/example.toml /etc/gs/example.toml
USER nobody
