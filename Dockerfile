# syntax=docker/dockerfile:1
#
# The operator image: ghcr.io/mail-integration-operator/mail-integration-operator:<crate version>
#   docker buildx build --platform linux/amd64,linux/arm64 \
#     -t ghcr.io/mail-integration-operator/mail-integration-operator:0.1.0 .
#
# A statically linked musl binary on distroless/static: the crate uses rustls with ring (no OpenSSL)
# and compiles its only other C library, jemalloc, in, so a static build is a plain `cargo build`,
# and the runtime image then holds
# no libc, no shell and no package manager: only the binary, CA certificates, tzdata and a nonroot
# user (65532). Lint: tools/hadolint.sh.

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS builder
ARG TARGETARCH
# musl-tools: the C compiler wrapper that the build scripts of ring and jemalloc use for the musl
# target. Not pinned to a Debian revision: a bookworm security update removes the old one from the
# archive.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Everything the manifest names: cargo refuses a Cargo.toml whose [[bench]] file is missing, even for
# `--bin` (tests/install.rs::dockerfile_context_holds_what_cargo_needs copies what these lines copy
# and fails when cargo cannot read it).
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
# BuildKit caches keep the registry and the target dir between builds; the binary is copied out of
# the cache mount so that the next stage can take it. jemalloc (the operator's allocator) is built
# for 64 KiB pages on arm64, so that the binary also runs on kernels with 64 KiB pages, not only 4 KiB.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target,sharing=locked \
    case "${TARGETARCH:-amd64}" in \
      amd64) target=x86_64-unknown-linux-musl ;; \
      arm64) target=aarch64-unknown-linux-musl; export JEMALLOC_SYS_WITH_LG_PAGE=16 ;; \
      *) echo "unsupported TARGETARCH ${TARGETARCH}" >&2; exit 1 ;; \
    esac \
 && rustup target add "${target}" \
 && cargo build --release --locked --target "${target}" --bin mail-integration-operator \
 && cp "target/${target}/release/mail-integration-operator" /mail-integration-operator

FROM gcr.io/distroless/static-debian12:nonroot
LABEL org.opencontainers.image.title="mail-integration-operator" \
      org.opencontainers.image.description="Kubernetes operator that keeps mailbox integrations connected through OAuth 2.0" \
      org.opencontainers.image.source="https://github.com/mail-integration-operator/mail-integration-operator" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=builder /mail-integration-operator /usr/local/bin/mail-integration-operator
# distroless "nonroot": uid/gid 65532, the same numbers the Helm chart and deploy/ run as.
USER 65532:65532
# 8080: sign-in pages and OAuth callback; 9090: /healthz, /readyz, /metrics.
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/mail-integration-operator"]
CMD ["run"]
