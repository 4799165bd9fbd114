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
# TW-LB's answer sampler for Envoy (dataplane/sampler.c, an Envoy dynamic module), built
# here so the runtime image needs no compiler; Envoy's pod finds it through
# ENVOY_DYNAMIC_MODULES_SEARCH_PATH, `twlb envoy` through TWLB_ENVOY_MODULES.
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
 && /opt/twlb/bin/python -c "from pathlib import Path; from twlb.envoy.process import build_sampler; build_sampler(Path('/opt/twlb/lib/envoy-modules'))" \
 && rm /opt/twlb/lib/envoy-modules/sampler.c

FROM python:3.11-slim
COPY --from=build /opt/twlb /opt/twlb
ENV PATH=/opt/twlb/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    TWLB_ENVOY_MODULES=/opt/twlb/lib/envoy-modules
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["twlb"]
CMD ["--help"]
