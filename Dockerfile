# mailhop node image: one node per container, config at /etc/mailhop/mailhop.toml,
# spool on a volume.  Build: docker build -t mailhop .
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY src ./src
RUN pip install --no-cache-dir --prefix=/install -c constraints.txt .

FROM python:3.11-slim
RUN useradd --system --uid 10025 --home-dir /var/spool/mailhop --shell /usr/sbin/nologin mailhop \
    && install -d -o mailhop -g mailhop -m 0700 /var/spool/mailhop \
    && install -d -o mailhop -g mailhop -m 0755 /var/log/mailhop /etc/mailhop
COPY --from=build /install /usr/local
USER mailhop
VOLUME ["/var/spool/mailhop"]
EXPOSE 2525 3535
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s CMD ["mailhop", "probe", "--tls", "none", "--timeout", "3", "127.0.0.1:2525"]
ENTRYPOINT ["mailhop"]
CMD ["serve", "-c", "/etc/mailhop/mailhop.toml"]
