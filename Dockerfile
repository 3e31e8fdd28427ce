# syntax=docker/dockerfile:1
# Multi-stage build: the release binary, built exactly as scripts/test builds
# it (`cargo build --release --locked`), in a minimal non-root runtime image
# that runs the controller.

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
RUN cargo build --release --locked

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/stackwarden /usr/local/bin/stackwarden
COPY desired-state /etc/stackwarden/desired-state
COPY templates /etc/stackwarden/templates
WORKDIR /etc/stackwarden
# What the daemon needs from its environment:
# - AWS_REGION (or AWS_DEFAULT_REGION): the region of the management account
#   clients (SNS topics and CloudWatch use each environment's region);
# - credentials from the standard chain: the ECS task role or EKS pod
#   identity of the management account; each environment's own role is
#   assumed from there (assume_role in desired-state/<env>.yaml);
# - optionally RUST_LOG (default info) and STACKWARDEN_DESIRED_STATE (a
#   git-sync sidecar may keep a mounted folder current instead).
# Logs are JSON lines on stderr (no TTY), for CloudWatch Logs.
ENV STACKWARDEN_DESIRED_STATE=/etc/stackwarden/desired-state
USER nonroot:nonroot
EXPOSE 9090
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD ["/usr/local/bin/stackwarden", "healthcheck", "--addr", "127.0.0.1:9090"]
# SIGTERM (docker stop, ECS, Kubernetes) lets a running pass finish within
# --shutdown-grace, then exits 0; give the container a longer stop timeout.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/stackwarden"]
CMD ["reconcile", "--listen", "0.0.0.0:9090", "--interval", "5m", "--shutdown-grace", "30s"]
