# The commands of docs/tutorials/across-organisations.md, run by tests/test_tutorials.py
# (which sets `run` and `port` itself and skips the "settings" section).

# --8<-- [start:settings]
run=hospitals   # the run's name: its vhost, exchange and users are named after it
port=5672       # the broker's AMQP port
# --8<-- [end:settings]

# --8<-- [start:provision]
brokerfl provision hospitals.yaml --run "$run" --clients 3 --host localhost --port "$port" --out fed
ls fed
# --8<-- [end:provision]

# --8<-- [start:import]
install -m 0644 fed/definitions.json "/tmp/$run-definitions.json"
rabbitmqctl import_definitions "/tmp/$run-definitions.json"
rm "/tmp/$run-definitions.json"
# --8<-- [end:import]

# --8<-- [start:wait]
for attempt in $(seq 60); do  # the import finishes in the background: wait until a client can log in
  (set -a && . "fed/$run-client-2.env" && brokerfl ping > /dev/null 2>&1) && break
  sleep 1
done
# --8<-- [end:wait]

# --8<-- [start:run]
(set -a && . "fed/$run-server.env" && brokerfl server hospitals.yaml > server.log 2>&1) &
for id in 0 1 2; do
  (set -a && . "fed/$run-client-$id.env" && brokerfl client hospitals.yaml > "client-$id.log" 2>&1) &
done
wait
tail -n 1 server.log
# --8<-- [end:run]

# --8<-- [start:accounting]
(set -a && . "fed/$run-admin.env" && brokerfl accounting hospitals.yaml)
# --8<-- [end:accounting]

# --8<-- [start:forge]
(set -a && . "fed/$run-client-0.env" && brokerfl client hospitals.yaml --client-id 1 --max-reconnect-s 5) || echo "exit $?"
# --8<-- [end:forge]

# --8<-- [start:keygen]
brokerfl keygen --user "$run-client-2" --out site-2
ls site-2
# --8<-- [end:keygen]

# --8<-- [start:tls]
brokerfl provision hospitals.yaml --run "$run" --clients 3 --host localhost --tls \
  --ca-dir ca --sign "site-2/$run-client-2.csr" --out fed-tls
ls fed-tls fed-tls/tls
# --8<-- [end:tls]

# --8<-- [start:cleanup]
rabbitmqctl delete_vhost "$run"
for user in server admin client-0 client-1 client-2; do
  rabbitmqctl delete_user "$run-$user"
done
# --8<-- [end:cleanup]
