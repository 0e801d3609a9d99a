"""fl-client, and the library that makes a training script a federation client (docs/client-api.md):

    import fl_client

    with fl_client.connect("server:50051", client_id="3", tls_ca="ca.pem") as federation:
        for task in federation.rounds():
            model.load_state_dict(task.global_state)
            ...                                             # train as before
            task.submit(model, num_samples=len(dataset))
"""
from fl_client.api import Federation, connect
from fl_client.connection import RequestRefusedError, ServerUnreachableError
from fl_client.task import Evaluation, Result, Task, TaskError

__all__ = ["Evaluation", "Federation", "RequestRefusedError", "Result", "ServerUnreachableError", "Task",
           "TaskError", "connect"]
