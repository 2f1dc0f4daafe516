# volume-daemon, volumectl and the CloudStack simulator (docs/deployment.md, "The container
# image"). Targets: `volume-daemon` (the default, last) and `simulator`.
#   docker build -t volume-daemon .
#   docker build --target simulator -t cloudstack-sim .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bins

# What both images share: the binaries, CA certificates, and a numeric user (10001) that
# owns the directories the daemon writes. Kubernetes' runAsNonRoot needs a number.
FROM debian:bookworm-slim AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 volume-daemon \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin volume-daemon \
 && install -d -o 10001 -g 10001 -m 0755 /run/volume-daemon /var/lib/volume-daemon \
      /var/lib/volume-daemon/exports
COPY --from=build /src/target/release/volume-daemon /src/target/release/volumectl /src/target/release/cloudstack-sim /usr/local/bin/

# The CloudStack simulator (the default cloud of the compose file).
FROM runtime AS simulator
USER 10001:10001
EXPOSE 8080
CMD ["cloudstack-sim", "--listen", "0.0.0.0:8080"]

# The daemon. Its settings come from the environment (docs/configuration.md); these are the
# ones a container needs to differ from the defaults.
FROM runtime AS volume-daemon
ENV HTTP_ADDR=0.0.0.0:8090 \
    PERSISTENT_DEVICE_DIR=/run/volume-daemon/devices \
    LOG_FORMAT=json
USER 10001:10001
EXPOSE 8090
# Ready (GET /ready answers 200): the database, the broker and the device monitor are up.
HEALTHCHECK --interval=10s --timeout=6s --start-period=20s --retries=3 \
  CMD ["volume-daemon", "healthcheck"]
CMD ["volume-daemon"]
