# The commands of docs/tutorials/containers.md, run by tests/test_containers.py (which sets
# its own image tag, compose project, ports and results directory and skips "settings").

# --8<-- [start:settings]
export BROKERFL_IMAGE=brokerfl:latest
export BROKERFL_BROKER_IMAGE=brokerfl-rabbitmq:bookworm
export BROKERFL_ROUNDS=5
export BROKERFL_RUNS="$PWD/runs"
mkdir -p runs && chown 1000 runs
# --8<-- [end:settings]

# --8<-- [start:base]
docker/build-base.sh
# --8<-- [end:base]

# --8<-- [start:build]
docker build -f docker/Dockerfile -t "$BROKERFL_IMAGE" --build-arg BASE=brokerfl-base:bookworm .
# --8<-- [end:build]

# --8<-- [start:up]
docker-compose -f docker/compose.yaml up -d
# --8<-- [end:up]

# --8<-- [start:ps]
docker-compose -f docker/compose.yaml ps
# --8<-- [end:ps]

# --8<-- [start:logs]
docker-compose -f docker/compose.yaml logs --no-color --tail 1 server
ls "$BROKERFL_RUNS/compose-digits"
# --8<-- [end:logs]

# --8<-- [start:accounting]
docker-compose -f docker/compose.yaml run --rm --no-deps server brokerfl accounting --log-level warning
# --8<-- [end:accounting]

# --8<-- [start:down]
docker-compose -f docker/compose.yaml down -v
# --8<-- [end:down]
