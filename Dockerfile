# Builds volume-daemon, volumectl and cloudstack-sim into one small image.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bins

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/volume-daemon /src/target/release/volumectl /src/target/release/cloudstack-sim /usr/local/bin/
USER nobody
CMD ["volume-daemon"]
