"""Celery configuration: a plain Celery config module, derived from :mod:`tasks.settings`.

Celery exports every public module-level name of this module as a setting (``celery
inspect conf``, Flower's worker page) and masks only names that look secret.  So every
helper here starts with ``_``, and the only public names are Celery's own settings; the
broker and backend URLs are ones Celery masks itself.

``REDIS_URL`` is broker and result backend; ``CELERY_BROKER_URL`` and
``CELERY_RESULT_BACKEND`` override each.  A RabbitMQ broker with a Redis backend works:
RabbitMQ cancels a consumer that holds an unacknowledged message longer than its
``consumer_timeout`` (30 min by default) and, with late acks, redelivers the job; the
``gpu`` queue is therefore declared with ``x-consumer-timeout`` above the longest job.
"""

from kombu import Exchange as _Exchange
from kombu import Queue as _Queue

from tasks.settings import current as _current

_s = _current()

broker_url = _s.broker_url
result_backend = _s.result_backend

task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]
timezone = "UTC"

# Webhook deliveries have a queue of their own, consumed by a small non-GPU worker
# (``celery -A tasks worker -Q webhooks -P threads``): a slow receiver never holds a GPU.
task_routes = {"tasks.generate_video": {"queue": "gpu"}, "tasks.deliver_webhook": {"queue": "webhooks"}}
# Each queue has its own exchange and routing key, so the worker banner (and RabbitMQ's bindings)
# say what happens: Celery publishes on the default exchange with the queue's name as the key.
task_queues = [
    _Queue(
        "gpu",
        _Exchange("gpu"),
        routing_key="gpu",
        queue_arguments={"x-consumer-timeout": (_s.max_job_seconds + 3600) * 1000}
        if broker_url.startswith("amqp")
        else None,
    ),
    _Queue("webhooks", _Exchange("webhooks"), routing_key="webhooks"),
]
task_default_queue = "gpu"

# One job at a time per worker; a job whose worker dies goes back to the queue.
task_acks_late = True
task_reject_on_worker_lost = True
worker_prefetch_multiplier = 1
worker_concurrency = 1
broker_transport_options = {"visibility_timeout": _s.max_job_seconds + 3600}
broker_connection_retry_on_startup = True
broker_connection_max_retries = None  # a broker restart costs a reconnect, never the worker

# Celery's own result writes retry briefly: progress written during a Redis outage is
# skipped by the task (tasks/job.py) instead of stalling sampling; finals are written
# by the lifecycle, which retries for FRAMEPACK_FINAL_RETRY_SECONDS.
result_backend_transport_options = {
    "retry_policy": {"max_retries": 3, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5}
}
redis_socket_connect_timeout = 2
redis_backend_health_check_interval = 10

# A pool child loads its model in the background (tasks/worker.py), so it reports "up"
# quickly; the margin covers a slow fork on a loaded machine.
worker_proc_alive_timeout = 60

task_time_limit = _s.max_job_seconds
task_soft_time_limit = _s.max_job_seconds - 60
# The job's first update (state running) is written by the lifecycle, not by Celery's
# STARTED, which would overwrite the final of a job cancelled while queued.
task_track_started = False

# Flower sees jobs live: the task announces progress and its end itself (tasks/lifecycle.py).
worker_send_task_events = True
task_send_sent_event = True

result_extended = False
result_expires = _s.result_ttl
