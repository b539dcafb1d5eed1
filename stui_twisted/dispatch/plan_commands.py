"""C{whoami} and C{validate_feature_access} (access.md §2): what a principal's plan allows.

Neither is gated by a plan; both read the dispatcher's
L{stui_twisted.access.plans.PlanBook} at call time, so a reload shows in
the next answer.
"""

from __future__ import annotations

from stui_twisted.access.plans import FEATURES
from stui_twisted.dispatch.dispatcher import Call, Command, Param
from stui_twisted.protocol.errors import invalid_parameter
from stui_twisted.protocol.timefmt import iso_timestamp


def build_plan_commands(dispatcher, authenticator=None) -> list[Command]:
    """The two plan questions, answered from C{dispatcher.plans} (and the token's expiry)."""

    def token_expiry(call: Call) -> str | None:
        token = call.request.token
        if token is None or authenticator is None or not authenticator.enabled:
            return None
        expires_at = authenticator.token_expires_at(token)
        return None if expires_at is None else iso_timestamp(expires_at)

    def whoami(call: Call) -> dict:
        client_id = call.client_id
        plan = dispatcher.plans.plan_for(client_id)
        return {
            "client_id": client_id,
            "plan": plan.name,
            "features": sorted(plan.features),
            "limits": dispatcher.plans.limits_for(client_id),
            "authenticated": call.principal is not None,
            "token_expires_at": token_expiry(call),
        }

    def validate_feature_access(call: Call) -> dict:
        feature = call.params["feature"]
        if feature not in FEATURES:
            raise invalid_parameter(
                "feature",
                f"names no feature: {feature[:60]!r}; the features are {', '.join(FEATURES)}",
                features=list(FEATURES),
            )
        plan = dispatcher.plans.plan_for(call.client_id)
        return {
            "feature": feature,
            "access_granted": feature in plan.features,
            "subscription_tier": plan.name,
            "expires_at": token_expiry(call),
        }

    return [
        Command(
            "whoami",
            whoami,
            (Param("client_id", "string"),),
            "who this request acts as: plan, features, limits, token expiry",
        ),
        Command(
            "validate_feature_access",
            validate_feature_access,
            (Param("feature", "string", True, lowercase=True), Param("client_id", "string")),
            "whether the caller's plan includes a feature",
        ),
    ]
