"""The OAO scheduler: validates and submits DAGs, reaps dead workers, promotes retries."""
