# The pipeline's image: the package with its text extra (all-MiniLM-L6-v2 bundled, nothing is
# downloaded at run time) on PyTorch's CUDA runtime image. The same image serves the GPU
# worker, the CPU worker (MOE_DEVICE=cpu), the librarian and query workers, and migrations.
FROM pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    MOE_STATE_DIR=/var/lib/moe

RUN groupadd --gid 10001 moe && useradd --uid 10001 --gid moe --create-home moe

WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY pipeline ./pipeline
# The base image's torch satisfies the package's torch>=2.9,<3, so pip keeps it.
RUN pip install '.[text,monitor,serve]' && mkdir -p /var/lib/moe && chown moe:moe /var/lib/moe

USER moe
VOLUME ["/var/lib/moe"]
CMD ["moe-pipeline", "--help"]
