# syntax=docker/dockerfile:1
# Multi-stage build: the release binary, built exactly as scripts/test builds
# it (`cargo build --release --locked`), in a minimal non-root runtime image.

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
RUN cargo build --release --locked

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/stackwarden /usr/local/bin/stackwarden
COPY desired-state /etc/stackwarden/desired-state
COPY templates /etc/stackwarden/templates
WORKDIR /etc/stackwarden
# Region and credentials come from the standard AWS environment: the task or
# pod role (ECS task role, EKS IRSA), AWS_REGION, and per environment the
# role named in desired-state/<env>.yaml (assume_role).
ENV STACKWARDEN_DESIRED_STATE=/etc/stackwarden/desired-state
USER nonroot:nonroot
ENTRYPOINT ["/usr/local/bin/stackwarden"]
CMD ["reconcile"]
