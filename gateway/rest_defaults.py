"""Classes the REST_FRAMEWORK setting names (their own module: DRF imports them while its
own modules are still loading, so they cannot live beside the viewsets)."""

from django import forms
from django.core.exceptions import ValidationError
from django_filters import FilterSet
from django_filters.rest_framework import DjangoFilterBackend
from rest_framework import exceptions, filters, pagination

INT64_MAX = 2**63 - 1


class Pagination(pagination.PageNumberPagination):
    """`?page=N&page_size=M` (at most 500); answers carry count, next and previous."""

    page_size = 50
    page_size_query_param = "page_size"
    max_page_size = 500


class StrictOrderingFilter(filters.OrderingFilter):
    """`?ordering=` that refuses fields it does not know (DRF's silently ignores them)."""

    def get_ordering(self, request, queryset, view):
        params = request.query_params.get(self.ordering_param)
        if params:
            fields = [p.strip() for p in params.split(",") if p.strip()]
            context = {"request": request}
            valid = {name for name, _ in self.get_valid_fields(queryset, view, context)}
            unknown = [f for f in fields if f.lstrip("-") not in valid]
            if unknown:
                raise exceptions.ValidationError(
                    {
                        self.ordering_param: [
                            f"Cannot order by {', '.join(unknown)}; "
                            f"choose from {', '.join(sorted(valid))}."
                        ]
                    }
                )
        return super().get_ordering(request, queryset, view)


def _in_int64(clean):
    """A form field's clean() that refuses integers no database column holds (SQLite raises
    OverflowError on them, PostgreSQL a DataError: either would be a 500)."""

    def bounded(value):
        for item in value if isinstance(value, list | tuple) else [value]:
            try:
                number = int(str(item).strip())
            except (TypeError, ValueError):
                continue
            if abs(number) > INT64_MAX:
                raise ValidationError("Out of range.", code="invalid")
        return clean(value)

    return bounded


class BoundedFilterSet(FilterSet):
    """Filter sets whose id and number filters refuse out-of-range integers with a 400."""

    @property
    def form(self):
        if not hasattr(self, "_form"):
            form = super().form
            for field in form.fields.values():
                if isinstance(field, forms.ModelChoiceField | forms.IntegerField):
                    field.clean = _in_int64(field.clean)
        return self._form


class FilterBackend(DjangoFilterBackend):
    """`?field=value` filters (django-filter), on BoundedFilterSet."""

    filterset_base = BoundedFilterSet
