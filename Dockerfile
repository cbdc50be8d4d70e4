# feed-fanout: one image for every service; the command picks it
# (`ingest`, `archive`, `gateway`, `feeds`, `status`, `audit`). See compose.yaml.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY fanout ./fanout
COPY shared ./shared
COPY services ./services
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --system --uid 10001 --no-create-home fanout
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
ENV PYTHONUNBUFFERED=1 \
    FANOUT_LOG_FORMAT=json
USER fanout
# gateway, ingestor ops, archiver ops, simulator ops
EXPOSE 8000 9101 9102 9103
STOPSIGNAL SIGTERM
ENTRYPOINT ["fanout"]
CMD ["--help"]
