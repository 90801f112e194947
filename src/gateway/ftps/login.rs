//! FTPS logins: libunftp's `Authenticator` and `UserDetailProvider` over the gateway's
//! [`LiveLogins`].
//!
//! Contract:
//! - Password logins only, checked against the logins in force when the attempt is made
//!   with [`LiveLogins::check_password`], as SFTP does: on the bounded pool of password
//!   workers, at the cost of one Argon2 evaluation whether the user exists or not, so a
//!   refusal's timing does not tell which names exist.
//! - A failed attempt is logged at warn (user and reason) and answered only after
//!   [`REJECTION_DELAY`]. The password is never logged or kept.
//! - A successful one opens the user's [`Vfs`] (creating the home directory), records the
//!   user on the session span, and the login and the [`Vfs`] in the [`SessionContext`]
//!   (the front end watches the login for revocation, and checks uploads with the same
//!   [`Vfs`] libunftp's calls use before their data connection is used), and logs
//!   "Logged in" at info.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::gateway::ErrorChain;
use crate::gateway::audit::{MAX_USER_BYTES, clipped};
use crate::gateway::auth::LiveLogins;
use crate::gateway::ftps::backend::FtpUser;
use crate::gateway::ftps::engine::SessionContext;
use crate::gateway::vfs::Vfs;
use crate::storage::Storage;
use async_trait::async_trait;
use unftp_core::auth::{
    AuthenticationError, Authenticator, Credentials, Principal, UserDetailError, UserDetailProvider,
};

/// How long a refused login waits before it is answered, to slow down guessing.
pub const REJECTION_DELAY: Duration = Duration::from_secs(1);

/// The logins of one FTPS session.
pub struct PasswordLogin {
    logins: LiveLogins,
    storage: Storage,
    context: Arc<SessionContext>,
}

impl fmt::Debug for PasswordLogin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PasswordLogin")
    }
}

impl PasswordLogin {
    /// Checks passwords against `logins` and opens the user's view of `storage`.
    pub fn new(logins: LiveLogins, storage: Storage, context: Arc<SessionContext>) -> Self {
        Self {
            logins,
            storage,
            context,
        }
    }

    async fn refuse(&self, user: &str, reason: &'static str) -> AuthenticationError {
        let shown = clipped(user, MAX_USER_BYTES);
        tracing::warn!(parent: self.context.span(), user = %shown, reason, "Login failed");
        self.context.log().login(user, Some(reason)).await;
        tokio::time::sleep(REJECTION_DELAY).await;
        AuthenticationError::BadPassword
    }
}

#[async_trait]
impl Authenticator for PasswordLogin {
    async fn authenticate(
        &self,
        username: &str,
        credentials: &Credentials,
    ) -> Result<Principal, AuthenticationError> {
        let password = credentials.password.as_deref().unwrap_or_default();
        let login = match self
            .logins
            .check_password(username, password.as_bytes())
            .await
        {
            Ok(login) => login,
            Err(refusal) => return Err(self.refuse(username, refusal.reason()).await),
        };

        self.context.set_login(login);
        Ok(Principal {
            username: username.to_owned(),
        })
    }
}

#[async_trait]
impl UserDetailProvider for PasswordLogin {
    type User = FtpUser;

    async fn provide_user_detail(&self, principal: &Principal) -> Result<FtpUser, UserDetailError> {
        // The login that passed `authenticate` a moment ago, not a fresh lookup: the
        // configuration may have changed in between.
        let login = self
            .context
            .take_login()
            .filter(|login| login.user().name == principal.username)
            .ok_or_else(|| UserDetailError::UserNotFound {
                username: principal.username.clone(),
            })?;

        let user = login.user();
        match Vfs::open(self.storage.clone(), user, self.context.log()).await {
            Ok(vfs) => {
                let span = self.context.span();
                span.record("user", user.name.as_str());
                tracing::info!(parent: span, method = "password", "Logged in");
                self.context.log().login(&user.name, None).await;
                self.context.set_vfs(vfs.clone());
                self.context.set_logged_in(login.clone());
                Ok(FtpUser::new(user.name.clone(), vfs))
            }
            Err(error) => {
                tracing::warn!(
                    parent: self.context.span(),
                    user = %user.name,
                    error = %ErrorChain(&error),
                    "Login refused: home directory unusable"
                );
                let reason = "home directory unusable";
                self.context.log().login(&user.name, Some(reason)).await;
                Err(UserDetailError::Generic("home directory unusable".into()))
            }
        }
    }
}
