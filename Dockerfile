# Builds the aggregator and runs it against the broker given in the environment.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --bin aggregator

FROM debian:bookworm-slim
RUN useradd --system --home /var/lib/aggregator aggregator \
    && mkdir -p /var/lib/aggregator && chown aggregator /var/lib/aggregator
COPY --from=build /src/target/release/aggregator /usr/local/bin/aggregator
COPY config.toml /etc/aggregator/config.toml
USER aggregator
WORKDIR /var/lib/aggregator
ENV AGGREGATOR_STORE__PATH=/var/lib/aggregator/store \
    AGGREGATOR_HTTP__BIND=0.0.0.0:8080
EXPOSE 8080
ENTRYPOINT ["aggregator", "run", "--config", "/etc/aggregator/config.toml"]
