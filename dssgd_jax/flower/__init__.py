"""DSSGD deployed: each participant on its own machine, over Flower.

An optional extra (``pip install -e ".[flower]"``). :mod:`.node` is one
participant and :mod:`.coordinator` the parameter server, both free of
Flower; :mod:`.client_app` and :mod:`.server_app` are the Flower apps that
carry their messages (docs/deployment.md).
"""
