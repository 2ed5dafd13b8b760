"""Celery configuration, read from the environment (a plain Celery config module).

``REDIS_URL`` is broker and result backend; ``CELERY_BROKER_URL`` and
``CELERY_RESULT_BACKEND`` override each.  A RabbitMQ broker with a Redis backend works:
RabbitMQ cancels a consumer that holds an unacknowledged message longer than its
``consumer_timeout`` (30 min by default) and, with late acks, redelivers the job; the
``gpu`` queue is therefore declared with ``x-consumer-timeout`` above the longest job.
"""

import os

from kombu import Queue

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
#: The longest a job may run (seconds); the time limit, visibility timeout and RabbitMQ
#: consumer timeout are all derived from it.
MAX_JOB_SECONDS = int(os.environ.get("FRAMEPACK_MAX_JOB_SECONDS", 4 * 3600))

broker_url = os.environ.get("CELERY_BROKER_URL") or REDIS_URL
result_backend = os.environ.get("CELERY_RESULT_BACKEND") or REDIS_URL

task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]
timezone = "UTC"

task_routes = {"tasks.generate_video": {"queue": "gpu"}}
_queue_args = {"x-consumer-timeout": (MAX_JOB_SECONDS + 3600) * 1000} if broker_url.startswith("amqp") else None
task_queues = [Queue("gpu", queue_arguments=_queue_args)]
task_default_queue = "gpu"

# One job at a time per worker; a job whose worker dies goes back to the queue.
task_acks_late = True
task_reject_on_worker_lost = True
worker_prefetch_multiplier = 1
worker_concurrency = 1
broker_transport_options = {"visibility_timeout": MAX_JOB_SECONDS + 3600}
broker_connection_retry_on_startup = True

# A pool child loads its model in the background (tasks/worker.py), so it reports "up"
# quickly; the margin covers a slow fork on a loaded machine.
worker_proc_alive_timeout = 60

task_time_limit = MAX_JOB_SECONDS
task_soft_time_limit = MAX_JOB_SECONDS - 60
task_track_started = True

# Flower sees jobs live (task-progress events are sent by the task itself).
worker_send_task_events = True
task_send_sent_event = True

result_extended = False
result_expires = int(os.environ.get("FRAMEPACK_RESULT_EXPIRES", 7 * 24 * 3600))
