# The commands of docs/tutorials/over-rabbitmq.md, run by tests/test_tutorials.py
# (which sets BROKERFL_AMQP_URL and BROKERFL_RUN itself and skips the "settings" section).

# --8<-- [start:settings]
export BROKERFL_AMQP_URL=amqp://guest:guest@localhost:5672/
export BROKERFL_RUN=tutorial
# --8<-- [end:settings]

# --8<-- [start:ping]
brokerfl ping
# --8<-- [end:ping]

# --8<-- [start:start]
brokerfl server configs/digits_fedavg.yaml > server.log 2>&1 &
brokerfl client configs/digits_fedavg.yaml --client-id 0-8 > clients.log 2>&1 &
brokerfl client configs/digits_fedavg.yaml --client-id 9 > client-9.log 2>&1 &
client_9=$!
# --8<-- [end:start]

# --8<-- [start:wait]
for attempt in $(seq 600); do  # until round 2 is stored (at most a minute)
  [ "$(cat "runs/$BROKERFL_RUN/metrics.jsonl" 2>/dev/null | wc -l)" -ge 2 ] && break
  sleep 0.1
done
# --8<-- [end:wait]

# --8<-- [start:kill]
kill -9 "$client_9"
brokerfl status
# --8<-- [end:kill]

# --8<-- [start:restart]
brokerfl client configs/digits_fedavg.yaml --client-id 9 > client-9-again.log 2>&1 &
wait
tail -n 1 server.log
# --8<-- [end:restart]

# --8<-- [start:accounting]
brokerfl accounting
# --8<-- [end:accounting]

# --8<-- [start:same]
brokerfl simulate configs/digits_fedavg.yaml --out runs/simulated > /dev/null 2>&1
tail -n 1 "runs/$BROKERFL_RUN/metrics.jsonl" | grep -o '"sha256": "[0-9a-f]*"'
tail -n 1 runs/simulated/metrics.jsonl | grep -o '"sha256": "[0-9a-f]*"'
# --8<-- [end:same]

# --8<-- [start:clean]
brokerfl delete-run
# --8<-- [end:clean]
