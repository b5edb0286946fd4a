# The commands of docs/tutorials/own-app.md, run by tests/test_tutorials.py.

# --8<-- [start:new]
brokerfl new my_app
find my_app -type f | sort
# --8<-- [end:new]

# --8<-- [start:run-new]
cd my_app
brokerfl simulate
cd ..
# --8<-- [end:run-new]

# --8<-- [start:run-tiny]
brokerfl simulate tiny_app.yaml
# --8<-- [end:run-tiny]
