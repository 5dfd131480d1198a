"""The agent answers with the user's own text, streamed in pieces that cut words apart."""

from collections.abc import AsyncGenerator
from typing import Any, Literal

from homeassistant.components import conversation
from homeassistant.config_entries import ConfigEntry
from homeassistant.const import MATCH_ALL
from homeassistant.core import HomeAssistant
from homeassistant.helpers.entity_platform import AddConfigEntryEntitiesCallback

PIECE_CHARACTERS = 7
"""Characters per streamed piece; Home Assistant streams to TTS only after 60 characters."""


async def async_setup_entry(
    hass: HomeAssistant, entry: ConfigEntry, async_add_entities: AddConfigEntryEntitiesCallback
) -> None:
    async_add_entities([StreamingEchoAgent(entry)])


class StreamingEchoAgent(conversation.ConversationEntity):
    _attr_name = "Streaming echo"
    _attr_supports_streaming = True

    def __init__(self, entry: ConfigEntry) -> None:
        self._attr_unique_id = entry.entry_id

    @property
    def supported_languages(self) -> list[str] | Literal["*"]:
        return MATCH_ALL

    async def _async_handle_message(
        self, user_input: conversation.ConversationInput, chat_log: conversation.ChatLog
    ) -> conversation.ConversationResult:
        text = user_input.text

        async def deltas() -> AsyncGenerator[dict[str, Any]]:
            yield {"role": "assistant"}
            for start in range(0, len(text), PIECE_CHARACTERS):
                yield {"content": text[start : start + PIECE_CHARACTERS]}

        async for _content in chat_log.async_add_delta_content_stream(self.entity_id, deltas()):
            pass
        return conversation.async_get_result_from_chat_log(user_input, chat_log)
