"""Routing insight: what the experts learned (the routing report), comparing runs, sparse upcycling,
and expert pruning and merging.

    moekit inspect --model runs/small                  # report directory with index.html
    moekit plot runs/a runs/b                          # loss and balance curves of several runs
    moekit upcycle --from runs/dense --experts 8 --top-k 2 --out runs/upcycled
    moekit prune --model runs/small --experts 4 --method merge
"""

from moekit.insight.prune import PruneConfig, PruneResult, prune, prune_model
from moekit.insight.report import CollapseFlag, InspectConfig, InspectResult, inspect, write_report
from moekit.insight.routing import LayerRouting, RoutingData, RoutingRecorder, collect_routing
from moekit.insight.runs import compare_runs
from moekit.insight.upcycle import UpcycleConfig, UpcycleResult, upcycle, upcycle_model

__all__ = ["CollapseFlag", "InspectConfig", "InspectResult", "LayerRouting", "PruneConfig", "PruneResult",
           "RoutingData", "RoutingRecorder", "UpcycleConfig", "UpcycleResult", "collect_routing", "compare_runs",
           "inspect", "prune", "prune_model", "upcycle", "upcycle_model", "write_report"]
