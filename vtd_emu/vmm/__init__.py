from .guest import GuestDriver
