//! How Keel stores a state enum: as Postgres `text`, through one mapping.
//!
//! An enum with `fn as_str(self) -> &'static str` (the text in the column, the API and the
//! events) and `fn parse(&str) -> Option<Self>` (its inverse) gets sqlx's `Type`, `Encode`
//! and `Decode` from [`text_column!`](crate::text_column), so SQL binds the enum itself
//! (`.bind(JobState::Failed)`) and rows decode into it: no state is spelled as a string
//! literal in a query, and a value the code does not know fails to decode instead of
//! travelling on as a string. The column's CHECK constraint lists the same texts; a test next
//! to each enum keeps the two in step.
//!
//! Must not break: `as_str` is the stored format. Renaming a variant's text needs a migration
//! of the rows (and the CHECK constraint), never just a code change.

/// Implements sqlx's `Type`, `Encode` and `Decode` for Postgres `text` on an enum with
/// `fn as_str(self) -> &'static str` and `fn parse(&str) -> Option<Self>` (module docs);
/// `$what` names the enum in a decode error (`unknown job state "X"`).
#[macro_export]
macro_rules! text_column {
    ($ty:ty, $what:literal) => {
        impl $crate::sqlx::Type<$crate::sqlx::Postgres> for $ty {
            fn type_info() -> $crate::sqlx::postgres::PgTypeInfo {
                <str as $crate::sqlx::Type<$crate::sqlx::Postgres>>::type_info()
            }

            fn compatible(ty: &$crate::sqlx::postgres::PgTypeInfo) -> bool {
                <str as $crate::sqlx::Type<$crate::sqlx::Postgres>>::compatible(ty)
            }
        }

        impl $crate::sqlx::Encode<'_, $crate::sqlx::Postgres> for $ty {
            fn encode_by_ref(
                &self,
                buf: &mut $crate::sqlx::postgres::PgArgumentBuffer,
            ) -> Result<$crate::sqlx::encode::IsNull, $crate::sqlx::error::BoxDynError> {
                <&str as $crate::sqlx::Encode<'_, $crate::sqlx::Postgres>>::encode(
                    self.as_str(),
                    buf,
                )
            }
        }

        impl<'r> $crate::sqlx::Decode<'r, $crate::sqlx::Postgres> for $ty {
            fn decode(
                value: $crate::sqlx::postgres::PgValueRef<'r>,
            ) -> Result<Self, $crate::sqlx::error::BoxDynError> {
                let text =
                    <&str as $crate::sqlx::Decode<'r, $crate::sqlx::Postgres>>::decode(value)?;
                Self::parse(text).ok_or_else(|| format!("unknown {} {text:?}", $what).into())
            }
        }
    };
}
