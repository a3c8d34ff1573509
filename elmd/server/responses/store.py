"""Responses kept for `previous_response_id`, `GET` and `DELETE /v1/responses/{id}`: in
memory only (nothing reaches the disk), bounded by count and by the characters of text
they hold, the oldest dropped first. A daemon restart forgets them all."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from elmd.server.responses.schemas import ResponseObject

MAX_RESPONSES = 1024
MAX_CHARACTERS = 32 << 20  # text of the kept conversations, all together


@dataclass(frozen=True)
class StoredResponse:
    response: ResponseObject
    conversation: tuple[dict, ...]  # the messages it answered (without instructions) and its answer

    @property
    def calls(self) -> dict[str, str]:
        """call_id -> function name of the function calls it made, for their outputs' turns."""
        return {item.call_id: item.name for item in self.response.output if item.type == "function_call"}

    def characters(self) -> int:
        return sum(len(m["content"]) for m in self.conversation)


class ResponseStore:
    def __init__(self, max_responses: int = MAX_RESPONSES, max_characters: int = MAX_CHARACTERS):
        self.max_responses, self.max_characters = max_responses, max_characters
        self._items: OrderedDict[str, StoredResponse] = OrderedDict()
        self._characters = 0

    def put(self, response: ResponseObject, conversation: list[dict]) -> None:
        item = StoredResponse(response, tuple(conversation))
        self.delete(response.id)
        self._items[response.id] = item
        self._characters += item.characters()
        while self._items and (len(self._items) > self.max_responses or self._characters > self.max_characters):
            self.delete(next(iter(self._items)))

    def get(self, response_id: str) -> StoredResponse | None:
        return self._items.get(response_id)

    def delete(self, response_id: str) -> bool:
        item = self._items.pop(response_id, None)
        if item is None:
            return False
        self._characters -= item.characters()
        return True
