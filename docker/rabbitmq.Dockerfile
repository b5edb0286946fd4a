# RabbitMQ from Debian's package, for machines that cannot pull rabbitmq:3.13-management.
# Built by docker/build-base.sh on its offline base; with registry access use the official
# image instead (compose.yaml's default).
ARG BASE=debian:bookworm-slim
FROM ${BASE}
# policy-rc.d: the package must not try to start the service while it is installed
RUN printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d \
 && apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends rabbitmq-server \
 && rm -rf /var/lib/apt/lists/* /usr/sbin/policy-rc.d \
 && rabbitmq-plugins enable --offline rabbitmq_management \
 && printf 'loopback_users.guest = false\n' > /etc/rabbitmq/rabbitmq.conf
EXPOSE 5672 15672
CMD ["rabbitmq-server"]
