"""fl-client, and the library that makes a training script a federation client (docs/client-api.md):

    import fl_client

    with fl_client.connect("server:50051", client_id="3", tls_ca="ca.pem") as federation:
        for task in federation.rounds():
            model.load_state_dict(task.global_state)
            ...                                             # train as before
            task.submit(model, num_samples=len(dataset))
"""
import os

# gRPC's C core logs failures such as a refused TLS handshake on stderr itself, beside the one-line error
# fl-client (or the user's script) gets about them. Read when grpc loads, which importing this package does.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from fl_client.api import Federation, connect  # noqa: E402
from fl_client.connection import RequestRefusedError, ServerUnreachableError  # noqa: E402
from fl_client.task import Evaluation, Result, Task, TaskError  # noqa: E402

__all__ = ["Evaluation", "Federation", "RequestRefusedError", "Result", "ServerUnreachableError", "Task",
           "TaskError", "connect"]
