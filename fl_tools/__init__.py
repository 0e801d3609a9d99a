"""Research and operator tools built on the server, the client and common: the in-process simulation,
fl-experiment, fl-anomaly, the model-poisoning study and fl-demo. Nothing in fl_server, fl_client or
common imports this package."""
