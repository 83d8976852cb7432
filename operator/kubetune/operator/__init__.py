"""kubetune.operator: the kopf operator that turns FineTuneJobs into batch/v1 Jobs and keeps .status true.

`kopf run -m kubetune.operator` imports this package, so it registers the handlers on kopf's
default registry (tests build isolated registries with `handlers.register`).
"""

from kubetune.operator import handlers as handlers
