"""One step, no questions: the test adds the agent through the REST config flow."""

from typing import Any

from homeassistant.config_entries import ConfigFlow, ConfigFlowResult


class TestAgentFlow(ConfigFlow, domain="soprano_test_agent"):
    VERSION = 1

    async def async_step_user(self, user_input: dict[str, Any] | None = None) -> ConfigFlowResult:
        return self.async_create_entry(title="Streaming echo", data={})
