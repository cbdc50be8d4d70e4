from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class sport(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BASEBALL: _ClassVar[sport]
    BASKETBALL: _ClassVar[sport]
    FOOTBALL: _ClassVar[sport]
    BOXING: _ClassVar[sport]
    GOLF: _ClassVar[sport]
    NASCAR: _ClassVar[sport]
    TENNIS: _ClassVar[sport]
BASEBALL: sport
BASKETBALL: sport
FOOTBALL: sport
BOXING: sport
GOLF: sport
NASCAR: sport
TENNIS: sport

class event(_message.Message):
    __slots__ = ("sport", "match_title", "data_event")
    SPORT_FIELD_NUMBER: _ClassVar[int]
    MATCH_TITLE_FIELD_NUMBER: _ClassVar[int]
    DATA_EVENT_FIELD_NUMBER: _ClassVar[int]
    sport: sport
    match_title: str
    data_event: str
    def __init__(self, sport: _Optional[_Union[sport, str]] = ..., match_title: _Optional[str] = ..., data_event: _Optional[str] = ...) -> None: ...
