# resptrace's container image: `docker build -t resptrace:0.1.0 .` (or
# buildah/kaniko), then name it in deploy/kustomization.yaml. Without a
# container engine, `cargo xtask image` writes the same content as an OCI
# archive (docs/development.md).
#
# Stage 1 builds as a development machine does (docs/development.md):
# `cargo xtask setup` installs Debian's rustc-web with its prebuilt BPF core,
# bpf-linker and the eBPF toolchain (and, unused here, the test tools), then
# a plain release build.
FROM docker.io/library/rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo xtask setup \
 && cargo build --release --locked --package agent \
 && cp target/release/resptrace /resptrace

# Stage 2: the binary alone on distroless glibc (libc, libgcc_s: all that
# `ldd resptrace` lists). Runs as uid 0 with every capability dropped but
# CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN: the DaemonSet's securityContext.
FROM gcr.io/distroless/cc-debian12
COPY --from=build /resptrace /usr/bin/resptrace
ENTRYPOINT ["/usr/bin/resptrace"]
