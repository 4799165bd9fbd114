# One slim, non-root image for every TW-LB process: the operator, the balancer and the
# backend nodes all run `twlb <subcommand>`.
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 UV_NO_CACHE=1
RUN python -m pip install uv==0.13.8 && python -m venv /opt/twlb
WORKDIR /src
COPY pyproject.toml requirements.lock README.md ./
COPY twlb/ twlb/
COPY operator/ operator/
COPY services/ services/
COPY ml/ ml/
COPY chaos/ chaos/
COPY sim/ sim/
COPY gossip/ gossip/
COPY dashboard/ dashboard/
COPY orchestration/ orchestration/
COPY processes/ processes/
COPY dataplane/ dataplane/
# Runtime dependencies only, each at the version requirements.lock pins (the lock's dev
# extras, such as test tools and schema bundles, stay out of the image).
RUN uv pip install --python /opt/twlb/bin/python --constraint requirements.lock . \
 && /opt/twlb/bin/twlb --version

FROM python:3.11-slim
COPY --from=build /opt/twlb /opt/twlb
ENV PATH=/opt/twlb/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["twlb"]
CMD ["--help"]
